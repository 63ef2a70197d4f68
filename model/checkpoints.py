"""Loading pretrained weights, whatever format they come in.

`load_pretrained(path)` detects the format and returns a `Pretrained`: the model's arguments,
its position config, a state dict in the project's names and layout, and the tokenizer file
that belongs to it. Every load is safe: safetensors, or torch.load(weights_only=True).

Formats (see model/meta.py and model/hf.py for the readers and writers):
    project  a Lightning checkpoint file of this project (below)
    meta     a folder with consolidated.NN.pth model-parallel shards and params.json
    hf       a folder with config.json and model*.safetensors or pytorch_model*.bin (+ index)

Memory: tensors are read lazily (torch.load with mmap, safetensors one tensor at a time) and
cast straight to the requested dtype, and models are built on the meta device and take the
loaded tensors as they are (assign=True), so a checkpoint is never held twice.

The project's own checkpoints are Lightning checkpoints (also plain torch files) holding
    state_dict: {"model.<name>": tensor}   (the LightningModule's)
    pi_llama:   {"model_args": {...}, "position": {...}, "tokenizer_model": bytes | None, "format": 1,
                 "train_seq_len": int (the window it was trained at; absent from older checkpoints)}
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch
from torch import Tensor

from .args import ModelArgs
from .llama import Llama

PROJECT_KEY = "pi_llama"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


@dataclass
class Pretrained:
    """Weights plus everything needed to rebuild the model they belong to."""

    args: ModelArgs
    position: dict[str, Any]
    state_dict: dict[str, Tensor]
    tokenizer_path: Path | None = None
    source_format: str = "project"
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(
        self, position: Mapping[str, Any] | None = None, strict: bool = True, dtype: str | torch.dtype | None = None
    ) -> Llama:
        """The model with these weights, read with the stored position encoding or with `position`.

        The model's parameters are this object's tensors (no copy); with `dtype` they are cast
        first, replacing the stored tensors so that the old precision is not kept alive too.
        """
        from . import build_position  # late import: model/__init__ imports this module's siblings

        cast_state_dict(self.state_dict, dtype)
        with torch.device("meta"):
            model = Llama(self.args, build_position(self.args, position or self.position))
        load_into(model, self.state_dict, strict=strict)
        return model

    def validate(self) -> None:
        """Check, without building anything real, that the state dict has exactly the model's tensors and shapes."""
        from . import build_position

        source = self.extra.get("path") or f"the {self.source_format} checkpoint"
        with torch.device("meta"):
            expected = Llama(self.args, build_position(self.args, self.position)).state_dict()
        missing = [name for name in expected if name not in self.state_dict]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{source} lacks tensor {missing[0]}{more} that the model in its config needs; the checkpoint is incomplete, so copy every file again."
            )
        unexpected = [name for name in self.state_dict if name not in expected]
        if unexpected:
            raise CheckpointError(
                f"{source} has tensor {unexpected[0]} that the model its config describes does not have; the config does not belong to these weights."
            )
        for name, tensor in self.state_dict.items():
            if name == "position.table":
                continue  # a learned table of another length is resampled when loaded (load_into)
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(tensor.shape)} in {source} but the model its config describes needs "
                    f"{tuple(expected[name].shape)}; the config does not belong to these weights."
                )

    @classmethod
    def from_model(
        cls, model: Llama, position: Mapping[str, Any], tokenizer_path: str | os.PathLike | None = None
    ) -> "Pretrained":
        """Wrap a live model (sharing its tensors) so it can be exported like a loaded checkpoint."""
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        return cls(model.args, dict(position), state, Path(tokenizer_path) if tokenizer_path else None, "model")


# ----------------------------------------------------------------------------- dtypes

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as "bfloat16" (None stays None: keep what the file stores)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"dtype {dtype!r} is not supported for weights; choose float32, bfloat16 or float16.")


def cast_tensor(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`tensor` in `dtype` (floating tensors only; the same object when nothing changes)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def cast_state_dict(state: dict[str, Tensor], dtype: str | torch.dtype | None) -> None:
    """Cast every tensor of `state` in place, one at a time, so at most one extra tensor is alive."""
    dtype = resolve_dtype(dtype)
    for name in list(state):
        state[name] = cast_tensor(state[name], dtype)


def load_into(model: Llama, state: Mapping[str, Tensor], strict: bool = True) -> None:
    """Copy `state` into `model` (which may live on the meta device), checking every shape first.

    A learned absolute table of another length is resized the way the model's table says
    (interpolated, or given untrained rows); a table the model does not have (or one the
    checkpoint lacks) is reported by name.
    """
    own = model.state_dict()
    state = dict(state)
    if "position.table" in state and "position.table" in own and state["position.table"].shape != own["position.table"].shape:
        from .position import resize_table

        extend = getattr(model.position, "extend", "interpolate")
        state["position.table"] = resize_table(state["position.table"], own["position.table"].shape[0], extend)
    for name, tensor in state.items():
        if name in own and tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(own[name].shape)} in the model; "
                "the checkpoint was made for another model shape (check model= and the checkpoint's config)."
            )
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "was it saved with another position encoding or model?"
            )
    model.load_state_dict(state, strict=strict, assign=True)
    # A model built on the meta device keeps there any parameter the state dict lacked (strict=False), and
    # would fail at its first forward, far from the cause.
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise CheckpointError(f"the checkpoint has no weights for {left[:5]}{' ...' if len(left) > 5 else ''}; "
                              "load it into the model it was saved from (model= and position= of its run).")
    # Non-persistent buffers (rotary tables) were created on the meta device: rebuild lazily on first use.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(name, torch.empty(0, *buffer.shape[1:]), persistent=False)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain data; anything that would run code is refused.

    Zip-format files are memory-mapped, so their tensors cost no memory until they are read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a saved checkpoint file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as error:  # torch raises anything from KeyError to RuntimeError on a damaged file
        message = _ANSI.sub("", str(error))
        found = _UNSAFE_GLOBAL.search(message) if "Weights only load failed" in message else None
        if found:  # a pickle naming a callable: loading it would run code (random bytes name none)
            raise CheckpointError(
                f"{path} holds a pickled reference to {found.group(1)}, which could run code when unpickled, so it is "
                "refused; re-save the tensors with safetensors or with torch.save of a plain dict of tensors."
            ) from None
        first_line = message.strip().splitlines()[0][:160] if message.strip() else type(error).__name__
        detail = "" if "Weights only load failed" in message else f" ({first_line})"  # torch's text there is advice, not a cause
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint{detail}; the file is truncated or corrupt, so copy it again."
        ) from None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def project_payload(
    args: ModelArgs, position: Mapping[str, Any], tokenizer_path: Path | None, train_seq_len: int | None = None
) -> dict[str, Any]:
    """What the project stores beside the weights so a checkpoint rebuilds its own model.

    `train_seq_len` is the window the weights were trained at. It is usually the base window times the
    scale, but `seq_len=` can make it anything, and evaluation's default passkey window should be it.
    """
    tokenizer_model = Path(tokenizer_path).read_bytes() if tokenizer_path else None
    payload = {
        "format": FORMAT_VERSION,
        "model_args": args.to_dict(),
        "position": dict(position),
        "tokenizer_model": tokenizer_model,
    }
    if train_seq_len is not None:
        payload["train_seq_len"] = int(train_seq_len)
    return payload


def load_project_checkpoint(path: Path, dtype: str | torch.dtype | None = None) -> Pretrained:
    """A Lightning checkpoint of this project, its tensors cast to `dtype` if given."""
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or PROJECT_KEY not in checkpoint:
        hint = ""
        if isinstance(checkpoint, dict) and "tok_embeddings.weight" in checkpoint:
            hint = "; it looks like a Meta consolidated shard, so pass the folder that holds it and params.json"
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {PROJECT_KEY!r} entry){hint}.")
    meta = checkpoint.pop(PROJECT_KEY)
    if not isinstance(meta, dict) or not isinstance(meta.get("model_args"), dict) or not isinstance(meta.get("position"), dict):
        raise CheckpointError(f"{path} has a damaged {PROJECT_KEY!r} entry (no model_args or position); it was not "
                              "written by this project's trainer, so start from another checkpoint.")
    global_step = checkpoint.get("global_step")
    dtype = resolve_dtype(dtype)
    # Optimizer states and the like are dropped at once: only the model's tensors stay referenced.
    full_state = checkpoint.pop("state_dict", None)
    checkpoint.clear()
    if not isinstance(full_state, dict):
        raise CheckpointError(f"{path} has no 'state_dict' of tensors; it was not written by this project's trainer.")
    state = {k.removeprefix("model."): cast_tensor(full_state.pop(k), dtype) for k in list(full_state) if k.startswith("model.")}
    tokenizer_path = _materialise_tokenizer(meta.get("tokenizer_model"))
    try:
        args = ModelArgs.from_dict(meta["model_args"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} records model settings this project cannot build ({error}).") from None
    return Pretrained(
        args=args,
        position=dict(meta["position"]),
        state_dict=state,
        tokenizer_path=tokenizer_path,
        source_format="project",
        extra={"global_step": global_step, "path": str(path), "train_seq_len": _train_seq_len(meta, path)},
    )


def _train_seq_len(meta: Mapping[str, Any], path: Path) -> int | None:
    """The stored training window, None for checkpoints written before it was stored."""
    value = meta.get("train_seq_len")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path} records a training window {value!r} that is not a positive integer; its "
                              f"{PROJECT_KEY!r} entry is damaged, so start from another checkpoint.")
    return value


def _materialise_tokenizer(model_bytes: bytes | None) -> Path | None:
    """Write an embedded tokenizer to a content-addressed cache file (once) and return its path."""
    if not model_bytes:
        return None
    cache = Path(os.environ.get("PI_LLAMA_CACHE", Path.home() / ".cache" / "pi_llama")) / "tokenizers"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"embedded-{hashlib.sha256(model_bytes).hexdigest()[:16]}.model"
    if not path.exists():
        atomic_write_bytes(path, model_bytes)
    return path


def hidden_name(name: str) -> str:
    """A hidden name derived from the file or folder `name`, for what is written beside it on the way to it.

    Never containing "ckpt_": Lightning numbers the checkpoint it saves before SLURM requeues a job
    (hpc_ckpt_<n>.ckpt) from the digits of every name in the run folder that does, so a temporary
    ".hpc_ckpt_1.ckpt.<digits>" would make it look for, and write, hpc_ckpt_1<digits>.ckpt.
    """
    return "." + name.replace("ckpt_", "ckpt-")


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Let `write` fill a temporary file beside `path`, flush it to disk, then rename it over `path`:
    readers never see half a file, and a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{hidden_name(path.name)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` into `path`, atomically."""
    atomic_write(path, lambda handle: handle.write(data))


@contextmanager
def atomic_directory(destination: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `destination` that becomes `destination` only if the block succeeds.

    On any error the temporary folder (and any parent folder made for it) is removed, so a
    failed export leaves nothing behind. A non-empty destination is replaced only with `force`.
    """
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"destination {destination} is a file; name a folder to write the checkpoint into.")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise CheckpointError(f"destination {destination} is not empty; choose a new folder or pass --force to replace it.")
    made_parents = [parent for parent in destination.parents if not parent.exists()]
    blocking = next((p for p in destination.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise CheckpointError(f"destination {destination} cannot be created: {blocking} is a file, not a folder.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"))
    try:
        yield staging
        _fsync_tree(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
        if destination.exists():
            retired = staging.with_suffix(".replaced")
            os.replace(destination, retired)
            try:
                os.replace(staging, destination)
            except BaseException:
                os.replace(retired, destination)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in made_parents:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk before the rename publishes it."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    """Make the files created or renamed in `folder` durable (its entries, not only their data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- tokenizers

# A tiktoken BPE file (LLaMA 3's tokenizer.model) is lines of "<base64 token> <rank>".
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")
# LLaMA 3 appends 256 special tokens after the BPE ranks: <|begin_of_text|> first, <|end_of_text|> next.
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Rows a model's embedding table may have beyond its tokenizer's vocabulary: some checkpoints
# round the table up (to a multiple of 64 or 128) or add a pad token. More means another tokenizer.
VOCAB_PADDING_ALLOWED = 256


@dataclass(frozen=True)
class TokenizerInfo:
    """What a tokenizer file says about the vocabulary, read without loading a tokenizer library."""

    path: Path
    kind: str  # "sentencepiece" or "tiktoken"
    vocab_size: int
    bos_id: int
    eos_id: int


def tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Vocabulary size and BOS/EOS ids of a sentencepiece or tiktoken (LLaMA 3) tokenizer.model."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read tokenizer {path} ({error.strerror}); check the file.") from None
    if _TIKTOKEN_LINE.match(data[:4096].split(b"\n", 1)[0]):
        ranks = sum(1 for line in data.splitlines() if line.strip())
        return TokenizerInfo(path, "tiktoken", ranks + LLAMA3_NUM_SPECIAL_TOKENS, ranks, ranks + 1)
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception:
        raise CheckpointError(
            f"{path} is neither a sentencepiece model nor a tiktoken BPE file; put the tokenizer.model that came with the weights there."
        ) from None
    return TokenizerInfo(path, "sentencepiece", processor.get_piece_size(), processor.bos_id(), processor.eos_id())


def check_tokenizer(args: ModelArgs, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids do not fit the model's vocabulary (a path, TokenizerInfo or tokenizer object)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = tokenizer_info(tokenizer)
    name = getattr(tokenizer, "path", None) or type(tokenizer).__name__
    vocab = int(tokenizer.vocab_size)
    if vocab > args.vocab_size:
        raise CheckpointError(
            f"tokenizer {name} has {vocab} tokens but the model's embedding table tok_embeddings.weight has only "
            f"{args.vocab_size} rows; use the tokenizer the weights were trained with."
        )
    if args.vocab_size - vocab > VOCAB_PADDING_ALLOWED:
        raise CheckpointError(
            f"tokenizer {name} has {vocab} tokens but the model's embedding table tok_embeddings.weight has "
            f"{args.vocab_size} rows, so the two were made for different vocabularies; use the tokenizer the weights were trained with."
        )
    for label in ("bos_id", "eos_id"):
        token_id = int(getattr(tokenizer, label, -1))
        if token_id >= args.vocab_size:
            raise CheckpointError(
                f"tokenizer {name} has {label}={token_id}, beyond the model's {args.vocab_size}-row embedding table; "
                "use the tokenizer the weights were trained with."
            )


def check_same_tokenizer(pretrained: Pretrained, tokenizer: str | os.PathLike) -> None:
    """Refuse a tokenizer other than the one the weights come with (embedded in a project checkpoint, or
    beside Meta's or HF's weights): a vocabulary of the same size would still give every id another meaning.

    Two files are the same tokenizer when their bytes are, or when they hold the same vocabulary: a
    re-serialised copy (another sentencepiece version, line endings in a tiktoken file) is accepted.
    """
    own = pretrained.tokenizer_path
    if own is not None and not same_tokenizer(own, tokenizer):
        raise CheckpointError(f"tokenizer {tokenizer} is not the one these weights come with ({own}); leave data.tokenizer "
                              "unset to read them with their own.")


def same_tokenizer(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two tokenizer files are the same tokenizer: the same bytes, or the same vocabulary."""
    try:
        if Path(a).read_bytes() == Path(b).read_bytes():
            return True
        vocabulary = _vocabulary(Path(a))
        return vocabulary is not None and vocabulary == _vocabulary(Path(b))  # two unreadable files are not one tokenizer
    except OSError as error:
        raise CheckpointError(f"cannot read tokenizer {error.filename} ({error.strerror}); check the file.") from None


# Text the vocabulary comparison also encodes, so that two models with the same pieces but other
# normalisation rules (a dummy prefix, whitespace handling, byte fallback) count as different.
_PROBE_TEXT = "  Hello, World!\tIt's 2026 -- naïve café, 東京 and 3.14159.\n\nNew line."


def _vocabulary(path: Path) -> tuple | None:
    """What a tokenizer maps between text and ids, comparable across serialisations; None if unreadable."""
    data = path.read_bytes()
    if _TIKTOKEN_LINE.match(data[:4096].split(b"\n", 1)[0]):
        return ("tiktoken", tuple(sorted(line.split() for line in data.splitlines() if line.strip())))
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception:
        return None
    pieces = tuple((sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_unknown(i), sp.is_byte(i))
                   for i in range(sp.get_piece_size()))
    return ("sentencepiece", pieces, tuple(sp.encode(_PROBE_TEXT)), sp.bos_id(), sp.eos_id(), sp.pad_id())


# ----------------------------------------------------------------------------- detection

META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
_HF_FILE = re.compile(r"^(config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?)$")


def detect_format(path: str | os.PathLike) -> str:
    """"project", "meta" or "hf", judged from the files the path names or holds."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; check the path (absolute paths are safest).")
    if path.is_file():
        if META_SHARD.match(path.name) or path.name == "params.json":
            return "meta"
        if _HF_FILE.match(path.name):
            return "hf"
        if path.suffix in (".json", ".csv", ".md", ".yaml", ".log"):
            raise CheckpointError(f"{path} is a {path.suffix[1:]} file, not a checkpoint; pass a .ckpt file, or a Meta or HF folder.")
        return "project"
    names = {child.name for child in path.iterdir()}
    # Shards decide; a params.json beside HF files (a converted folder that kept Meta's config) is not Meta.
    if any(META_SHARD.match(name) for name in names):
        return "meta"
    if any(_HF_FILE.match(name) for name in names):
        return "hf"
    if "params.json" in names:
        return "meta"  # its reader names the missing shards
    if (path / "checkpoints" / "last.ckpt").exists():  # a train.py run folder
        raise CheckpointError(f"{path} is a training run's folder; pass its checkpoint, {path / 'checkpoints' / 'last.ckpt'} "
                              f"(or best.ckpt).")
    raise CheckpointError(
        f"{path} holds no checkpoint this project reads; expected a project .ckpt file, a Meta folder "
        "(consolidated.00.pth + params.json) or an HF folder (config.json + model.safetensors)."
    )


def load_pretrained(
    path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, max_seq_len: int | None = None
) -> Pretrained:
    """Load a checkpoint of any supported format (detected from what the path holds).

    `dtype` casts every tensor as it is read (None keeps the stored precision); `max_seq_len`
    overrides the window the weights were trained at, which Meta's params.json does not record.
    """
    path = Path(path).expanduser()
    kind = detect_format(path)
    dtype = resolve_dtype(dtype)
    folder = path if path.is_dir() else path.parent
    if kind == "meta":
        from .meta import load_meta  # late imports: both modules import this one

        return load_meta(folder, dtype=dtype, max_seq_len=max_seq_len)
    if kind == "hf":
        from .hf import load_hf

        pretrained = load_hf(folder, dtype=dtype)
    else:
        pretrained = load_project_checkpoint(path, dtype)
    if max_seq_len is not None:
        try:
            pretrained.args = pretrained.args.with_(max_seq_len=int(max_seq_len))
        except ValueError as error:
            raise CheckpointError(f"max_seq_len override rejected: {error}") from None
    pretrained.validate()
    return pretrained
