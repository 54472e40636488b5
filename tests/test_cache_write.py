"""reshape_and_cache_flash: tokens land at their slots, negative slots are skipped, strided caches work."""
import pytest
import torch

from flashserve.kernels import reshape_and_cache_flash
from flashserve.kernels import reference


def check_cache_write(tokens, heads_k, head_size, num_blocks, block_size, dtype, strided=False, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(tokens, heads_k, head_size, generator=gen).to(dtype).to(device)
    value = torch.randn(tokens, heads_k, head_size, generator=gen).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.25] = -1  # padding
    slots = slots.to(device)
    caches = []
    for _ in range(2):
        if strided:
            big = torch.randn(num_blocks, block_size + 2, heads_k + 1, head_size + 8, generator=gen)
            caches.append(big.to(dtype).to(device)[:, 1:-1, :heads_k, :head_size])
        else:
            caches.append(torch.randn(num_blocks, block_size, heads_k, head_size, generator=gen).to(dtype).to(device))
    key_cache, value_cache = caches
    ref_key_cache, ref_value_cache = key_cache.clone(), value_cache.clone()
    untouched = key_cache.clone()
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots)
    reference.reshape_and_cache_flash(key, value, ref_key_cache, ref_value_cache, slots)
    assert torch.equal(key_cache, ref_key_cache) and torch.equal(value_cache, ref_value_cache)
    kept = slots >= 0
    flat = key_cache.reshape(-1, heads_k, head_size)
    assert torch.equal(flat[slots[kept]], key[kept])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    written[slots[kept]] = True
    assert torch.equal(flat[~written], untouched.reshape(-1, heads_k, head_size)[~written])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_cache_write(block_size, dtype):
    check_cache_write(11, 2, 24, 12, block_size, dtype)


def test_cache_write_strided_cache():
    check_cache_write(9, 3, 16, 6, 4, torch.float16, strided=True)


def test_cache_write_strided_key_value():
    """key and value as views of one packed (T, 2, Hk, D) tensor are read in place."""
    kv = torch.randn(5, 2, 2, 8, dtype=torch.float16)
    key, value = kv[:, 0], kv[:, 1]
    key_cache, value_cache = torch.zeros(3, 4, 2, 8, dtype=torch.float16), torch.zeros(3, 4, 2, 8, dtype=torch.float16)
    slots = torch.tensor([7, -1, 0, 11, 4])
    reshape_and_cache_flash(key, value, key_cache, value_cache, slots)
    kept = slots >= 0
    assert torch.equal(key_cache.flatten(0, 1)[slots[kept]], key[kept])
    assert torch.equal(value_cache.flatten(0, 1)[slots[kept]], value[kept])


@pytest.mark.parametrize("name, change", [
    ("slot_mapping", lambda a: a.update(slot_mapping=a["slot_mapping"].int())),
    ("slot_mapping", lambda a: a.update(slot_mapping=a["slot_mapping"][:2])),
    ("value", lambda a: a.update(value=a["value"].half())),
    ("key_cache", lambda a: a.update(key_cache=a["key_cache"][:, :, :1])),
    ("value_cache", lambda a: a.update(value_cache=a["value_cache"][:, :2])),
    ("slot_mapping", lambda a: a.update(slot_mapping=torch.arange(6)[::2])),
])
def test_cache_write_invalid_arguments(name, change):
    args = dict(key=torch.randn(3, 2, 8), value=torch.randn(3, 2, 8), key_cache=torch.zeros(4, 4, 2, 8),
                value_cache=torch.zeros(4, 4, 2, 8), slot_mapping=torch.arange(3))
    change(args)
    with pytest.raises(ValueError, match=name):
        reshape_and_cache_flash(**args)
