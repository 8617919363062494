"""Checkpoint directories: `config.json` + `model.safetensors`, on any fsspec URL; never pickle.

config.json holds {"family": ..., "config": {...}, ...extra}; the family picks the class that rebuilds
the model (see `models.generator`). Weights are written before config.json, so a directory whose
config.json exists was completely written (S3 puts are atomic; a local crash mid-write leaves no config).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
from promptmill.models.errors import CheckpointError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.overrides import TorchFunctionMode

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_checkpoint(
    url: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    storage_options: dict | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Save `tensors` (a state dict) and `config`; `dtype` casts floating tensors (fp16 for shipping)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    fs.pipe(_join(path, WEIGHTS_NAME), st_save(out))
    fs.pipe(_join(path, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode())


MAX_HEADER_BYTES = 100 * 2**20
MAX_CONFIG_INT = 1 << 16  # widths, vocabularies, codebooks, lengths
MAX_LAYERS = 256
Shapes = dict[str, tuple[int, ...]]


class _SkipInit(TorchFunctionMode):
    """Initialisers (torch.nn.init, Tensor.normal_ ...) return their tensor untouched; random factories (randn,
    rand) return an empty tensor of their shape."""

    IN_PLACE = frozenset({"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_",
                          "log_normal_", "cauchy_"})
    EMPTY = {torch.randn: torch.empty, torch.rand: torch.empty, torch.randn_like: torch.empty_like,
             torch.rand_like: torch.empty_like}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = dict(kwargs or {}), getattr(func, "__name__", "")
        if getattr(func, "__module__", None) == "torch.nn.init" or name in self.IN_PLACE:
            return args[0] if args else kwargs["tensor"]
        if func in self.EMPTY:
            kwargs.pop("generator", None)
            return self.EMPTY[func](*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers. On meta they draw nothing anyway, but
    torch routes them through code that imports torch._dynamo: 0.9 s of CPU in the driver's preflight and again in
    every actor, before the first image. The mode is per thread, so no other thread's initialisers are touched."""
    with torch.device("meta"), _SkipInit():
        yield


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One part of a state dict (`vq.`, `gen.`, ...), with the part's prefix taken off."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
                   device: torch.device) -> torch.nn.Module:
    """Load the `prefix`ed tensors into a module built on the meta device (`on_meta`), taking
    them as they are instead of copying into randomly initialised weights: a 300M-parameter Transformer spent
    seconds initialising weights it then overwrote, on the one thread an actor builds its stage with. Strict, so a
    weight the checkpoint lacks fails here rather than staying on the meta device."""
    module.load_state_dict(prefixed(tensors, prefix), assign=True)
    return module.to(device)


def built_with_weights(make: Callable[[], Any], parts: dict[str, str], tensors: dict[str, torch.Tensor],
                       device: torch.device) -> Any:
    """`make()` built on the meta device, then each `prefix -> attribute` module given its stored tensors
    (`assign_weights`) and the object its `device`: how a generator loads without initialising what it replaces."""
    with on_meta():
        obj = make()
    for prefix, attr in parts.items():
        setattr(obj, attr, assign_weights(getattr(obj, attr), tensors, prefix, device))
    obj.device = device
    return obj


def meta_shapes(make: Callable[[], Any]) -> Shapes:
    """Tensor shapes of `make().state_dict()`, built on the meta device: no memory, whatever the config says."""
    with on_meta():
        obj = make()
    return {k: tuple(v.shape) for k, v in obj.state_dict().items()}


def _check_config(url: str, config: dict) -> None:
    """Bound every integer in the model config before anything is built from it (a hand-edited `n_embd` must not
    allocate gigabytes, a `n_layer` of a million must not build a million blocks, even on the meta device)."""
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            limit = MAX_LAYERS if "layer" in k else MAX_CONFIG_INT
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= limit:
                raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} {section}.{k} = {v} is out of range "
                                      f"[0, {limit}]")


def read_header(fs, path: str, url: str) -> Shapes:
    """Tensor names and shapes from a safetensors header (8-byte length, then JSON), without reading the weights;
    a file shorter or longer than the header's tensors is corrupt (a truncated upload, say)."""
    with fs.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= MAX_HEADER_BYTES:
            raise CheckpointError(f"checkpoint {url!r}: {WEIGHTS_NAME} is corrupt (header length {n})")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
            end = 8 + n + max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {url!r}: {WEIGHTS_NAME} is corrupt (header: {e})") from e
    size = fs.size(path)
    if size != end:
        raise CheckpointError(f"checkpoint {url!r}: {WEIGHTS_NAME} is corrupt (its header describes {end} bytes, the "
                              f"file has {size})")
    return shapes


def check_shapes(url: str, expected: Shapes, found: Shapes) -> None:
    if expected == found:
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k}: {found[k]} (config wants {expected[k]})" for k in sorted(set(expected) & set(found))
             if expected[k] != found[k]]
    parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
             f"shapes {wrong[:3]}" if wrong else ""]
    raise CheckpointError(f"checkpoint {url!r}: weights do not match {CONFIG_NAME} "
                          f"({'; '.join(p for p in parts if p)})")


def open_checkpoint(url: str, storage_options: dict | None = None, kind: str | None = None,
                    expect: Callable[[dict], Shapes] | None = None) -> tuple[dict, Any, str]:
    """(config, filesystem, weights path) after every check that reads no weight: both files exist, config.json
    is valid and bounded, `kind` is the `family` the caller needs, and the safetensors header holds the names and
    shapes `expect(config)` builds (`meta_shapes`) in a file of the length it says. Preflight stops here: a driver
    need not download a model its actors will load. Raises CheckpointError naming the file."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    cfg_path, w_path = _join(path, CONFIG_NAME), _join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not fs.exists(p):
            raise CheckpointError(f"checkpoint {url!r}: missing {p.rsplit('/', 1)[-1]}")
    try:
        config = json.loads(fs.cat_file(cfg_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or "family" not in config or "config" not in config:
        raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} lacks 'family' or 'config'")
    if kind is not None and config["family"] != kind:
        raise CheckpointError(f"checkpoint {url!r} is a {config['family']!r} checkpoint, not a {kind!r} one")
    _check_config(url, config)
    found = read_header(fs, w_path, url)
    if expect is not None:
        try:
            expected = expect(config)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} does not describe a model ({e})") from e
        check_shapes(url, expected, found)
    return config, fs, w_path


def load_checkpoint(url: str, storage_options: dict | None = None, kind: str | None = None,
                    expect: Callable[[dict], Shapes] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config, fp32 tensors), after `open_checkpoint`'s checks."""
    config, fs, w_path = open_checkpoint(url, storage_options, kind, expect)
    try:
        tensors = st_load(fs.cat_file(w_path))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {url!r}: {WEIGHTS_NAME} is corrupt ({e})") from e
    return config, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def load_module(url: str, kind: str, build: Callable[[dict], torch.nn.Module], storage_options: dict | None = None
                ) -> tuple[dict, torch.nn.Module]:
    """(config, module in eval mode) for the non-generator checkpoints (judge, vq, clip): `build(config)` makes
    the module, the weights must fit it exactly; any disagreement is a CheckpointError, never a traceback."""
    config, tensors = load_checkpoint(url, storage_options, kind, lambda c: meta_shapes(lambda: build(c)))
    try:
        module = build(config)
        module.load_state_dict(tensors)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {url!r}: weights do not match {CONFIG_NAME} ({e})") from e
    return config, module.eval()
