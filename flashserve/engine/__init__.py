"""The serving engine: requests, scheduler, block manager with prefix caching, model runner, sampler."""
