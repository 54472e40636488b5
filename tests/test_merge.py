"""merge_attn_states against its reference: dtypes, odd head sizes, strided inputs, +-inf LSEs, empty rows."""
import pytest
import torch

from flashserve.kernels import merge, merge_attn_states, merge_tuning
from flashserve.kernels import reference


def make_states(tokens, heads, head_size, dtype, seed=0, strided=False, device="cpu", inf_fraction=0.2):
    """Two random states; a fraction of the LSEs set to +inf or -inf at random positions (both kinds mean empty),
    and the outputs of those empty states filled with NaN (they must never leak into the result)."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(2):
        if strided:
            out = torch.randn(tokens, heads + 3, head_size + 5, generator=gen)[:, 1:heads + 1, :head_size]
            lse = (torch.randn(heads * 2, tokens, generator=gen) * 4)[::2]
        else:
            out = torch.randn(tokens, heads, head_size, generator=gen)
            lse = torch.randn(heads, tokens, generator=gen) * 4
        empty = torch.rand(heads, tokens, generator=gen) < inf_fraction
        sign = torch.where(torch.rand(heads, tokens, generator=gen) < 0.5, 1.0, -1.0)
        lse[empty] = sign[empty] * float("inf")
        out = out.to(dtype)
        out.transpose(0, 1)[empty] = float("nan")
        states.append((out.to(device), lse.to(device)))
    return states


def check_merge(tokens, heads, head_size, dtype, strided=False, device="cpu", inf_fraction=0.2, seed=0,
                config=None):
    """merge_attn_states (or, with ``config``, the kernel launched with that config) against the reference."""
    (p_out, p_lse), (s_out, s_lse) = make_states(tokens, heads, head_size, dtype, seed, strided, device,
                                                 inf_fraction)
    out = torch.full((tokens, heads, head_size), float("nan"), dtype=dtype, device=device)  # NaN-poisoned
    out_lse = torch.full((heads, tokens), float("nan"), device=device)
    if config is None:
        merge_attn_states(out, p_out, p_lse, s_out, s_lse, out_lse)
    else:
        merge.launch_merge(out, p_out, p_lse, s_out, s_lse, out_lse, config)
    ref = torch.empty_like(out)
    ref_lse = torch.empty_like(out_lse)
    reference.merge_attn_states(ref, p_out, p_lse, s_out, s_lse, ref_lse)
    assert not out.isnan().any() and not out_lse.isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.allclose(out_lse, ref_lse, atol=1e-5, rtol=1e-5)  # -inf == -inf counts as close
    both_empty = torch.isinf(p_lse) & torch.isinf(s_lse)
    assert (out_lse[both_empty] == float("-inf")).all()
    assert (out.transpose(0, 1)[both_empty] == 0).all()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, heads, head_size", [(7, 5, 24), (13, 16, 128), (3, 3, 80)])
def test_merge_matches_reference(tokens, heads, head_size, dtype):
    check_merge(tokens, heads, head_size, dtype)


@pytest.mark.parametrize("config", merge_tuning.CANDIDATES)
def test_every_launch_config_matches_reference(config):
    """Tiles of several tokens and head blocks that do not divide the shape (the sweep's candidates)."""
    if merge.use_triton(torch.empty(0)):
        check_merge(37, 5, 24, torch.float16, config=config._replace(tile_elements=config.tile_elements // 16))
        check_merge(11, 6, 32, torch.float32, strided=True, config=config._replace(tile_elements=256))


def test_tile_shapes_pad_heads_least():
    block_t, block_h, block_d, head_blocks = merge_tuning.tile_shape(merge_tuning.MergeConfig(4096, 4, False), 48,
                                                                      128)
    assert (block_t, block_h, block_d, head_blocks) == (2, 16, 128, 3)
    assert merge_tuning.tile_shape(merge_tuning.MergeConfig(2048, 4, False), 32, 128) == (1, 16, 128, 2)
    assert merge_tuning.tile_shape(merge_tuning.MergeConfig(8192, 8, True), 16, 80) == (4, 16, 128, 1)
    assert merge_tuning.tile_shape(merge_tuning.MergeConfig(2048, 4, False), 5, 24) == (64, 1, 32, 5)
    # capped head blocks: one head and many tokens per program (the LSE rows are read contiguously)
    assert merge_tuning.tile_shape(merge_tuning.MergeConfig(2048, 4, False, 1), 16, 128) == (16, 1, 128, 16)


def test_merge_strided_inputs():
    check_merge(9, 6, 40, torch.float16, strided=True)


def test_merge_all_empty_gives_zeros_and_minus_inf():
    out = check_merge(4, 3, 16, torch.float32, inf_fraction=1.0)
    assert (out == 0).all()


def test_merge_without_output_lse_and_equal_weights():
    out_a, out_b = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    lse = torch.zeros(2, 5)
    out = torch.empty_like(out_a)
    merge_attn_states(out, out_a, lse, out_b, lse.clone())
    assert torch.allclose(out, (out_a + out_b) / 2, atol=1e-6)


@pytest.mark.parametrize("name, change", [
    ("output", lambda a: a.update(output=a["output"].half())),
    ("suffix_output", lambda a: a.update(suffix_output=a["suffix_output"][:2])),
    ("prefix_lse", lambda a: a.update(prefix_lse=a["prefix_lse"].t())),
    ("suffix_lse", lambda a: a.update(suffix_lse=a["suffix_lse"].half())),
    ("output_lse", lambda a: a.update(output_lse=torch.empty(3))),
])
def test_merge_invalid_arguments(name, change):
    args = dict(output=torch.empty(4, 2, 8), prefix_output=torch.randn(4, 2, 8), prefix_lse=torch.randn(2, 4),
                suffix_output=torch.randn(4, 2, 8), suffix_lse=torch.randn(2, 4), output_lse=None)
    change(args)
    with pytest.raises(ValueError, match=name):
        merge_attn_states(**args)
