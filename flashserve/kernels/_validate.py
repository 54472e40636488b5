"""Input checks shared by the public kernel functions. Every failure raises ``ValueError`` naming the argument."""
import operator

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, tensor, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    """Raise ValueError unless ``tensor`` is a tensor of rank ``ndim``, one of ``dtypes``, on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(tensor.dtype).replace('torch.', '')}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")


def check_index_tensor(name: str, tensor, ndim: int, device: torch.device, dtype: torch.dtype = torch.int32) -> None:
    """Raise ValueError unless ``tensor`` is an index tensor of rank ``ndim`` and ``dtype`` on ``device``, contiguous
    in its last dimension (the kernels index it with unit stride there; other strides are passed to them)."""
    check_tensor(name, tensor, ndim, (dtype,), device)
    check_last_dim_contiguous(name, tensor)


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError unless the last dimension of ``tensor`` has stride 1 (other strides may be anything)."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(tensor.stride())}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """Raise ValueError unless ``tensor.shape == shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_window_size(window_size) -> tuple[int, int]:
    """Return ``window_size`` as a pair of ints >= -1, or raise ValueError."""
    try:
        left, right = (operator.index(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints, got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1, got {window_size!r}")
    return left, right


def check_alibi_slopes(alibi_slopes, batch: int, nheads: int, device: torch.device) -> None:
    """Raise ValueError unless ``alibi_slopes`` is None or fp32 of shape (H,) or (B, H) on ``device``, contiguous
    in its last dimension."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes, None, (torch.float32,), device)
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    check_last_dim_contiguous("alibi_slopes", alibi_slopes)


def check_dropout(dropout_p: float) -> None:
    """flashserve is an inference library: any dropout is refused."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (flashserve is an inference library), got {dropout_p}")


def check_softcap(softcap: float) -> None:
    """Raise ValueError unless ``softcap >= 0``."""
    if not softcap >= 0.0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")


def check_count(name: str, value) -> int:
    """Return ``value`` as a Python int >= 0 (any integer type but bool, e.g. numpy ints), or raise ValueError."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return count


def rows_view(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """(..., hidden) -> a (rows, hidden) view of the same memory; ValueError if the rows are not evenly strided
    (the layer kernels walk rows with one stride and never copy their inputs)."""
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name} must be viewable as (rows, hidden), got shape {tuple(tensor.shape)} and strides "
                         f"{tuple(tensor.stride())}") from None
