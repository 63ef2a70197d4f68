"""The Lightning DataModule: tokenizer + token cache + packed windows for train/validation/test."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data import sources
from data.errors import DataError
from data.packing import PackedWindows
from data.splits import SPLITS
from data.synthetic_passkey import RECIPE as PASSKEY_RECIPE
from data.synthetic_passkey import BlockPlacement, count_for_share, passkey_documents, spread_offsets
from data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer
from data.locking import exclusive_build
from data.tokens import TokenStore, cache_key, encoded, is_complete, write_split

log = logging.getLogger(__name__)

CACHE_ENV = "PI_LLAMA_CACHE"
# Bump when train_tokenizer's settings change, so old cached tokenizers are not reused.
TOKENIZER_RECIPE = 1
# The train stream's shuffling (ResumableSampler), saved with the data position. 2: pass p is seeded with
# seed + p x PASS_SEED_STRIDE; 1: with seed + p.
DATA_ORDER = 2
_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ()}


class ResumableSampler(Sampler[int]):
    """One rank's share of an endless stream of shuffled passes over the train windows.

    The stream is the concatenation of randperm(n) seeded with seed + pass x PASS_SEED_STRIDE; global
    sample g goes to rank g mod world_size, so with a global batch of B the union of the ranks' batches
    is the same B consecutive samples whatever the number of processes (2 x 2 equals 1 x 4).
    Each iteration starts where `position()` (global samples already trained on) says, which is
    what makes a resumed run see exactly the data the interrupted one would have seen next.
    """

    # Passes of one seed are this many seeds apart (seed + pass made seed s's second pass seed s + 1's
    # first, so the runs of a seed sweep longer than a pass shared orders); pass 0 is seed's as before.
    PASS_SEED_STRIDE = 1_000_003

    def __init__(
        self, num_samples: int, seed: int, position: Callable[[], int], rank: int = 0, world_size: int = 1,
        per_step: int = 1,
    ) -> None:
        """`position` is a callable returning the number of global samples consumed so far; `per_step` is how
        many samples one rank takes per optimizer step (batch size x gradient accumulation)."""
        self.num_samples, self.seed, self.position, self.rank, self.world_size = num_samples, seed, position, rank, world_size
        self.per_step = per_step

    def __len__(self) -> int:
        """About one pass's share per rank, what Lightning counts as an epoch, cut to whole optimizer steps.

        Lightning steps the optimizer at every epoch's end: an epoch ending inside an accumulation would
        make a step of fewer micro-batches than the others. Nothing is skipped by the cut: the next epoch
        goes on from `position()`.
        """
        return (self.num_samples // self.world_size) // self.per_step * self.per_step

    def _order(self, data_pass: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + data_pass * self.PASS_SEED_STRIDE)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        # Read the position when iteration starts (lazily, after any checkpoint was restored).
        first = int(self.position()) + self.rank
        cached_pass, order = -1, []
        for k in range(len(self)):
            data_pass, offset = divmod(first + k * self.world_size, self.num_samples)
            if data_pass != cached_pass:
                cached_pass, order = data_pass, self._order(data_pass)
            yield order[offset]


def default_cache_dir() -> Path:
    """$PI_LLAMA_CACHE, or ~/.cache/pi_llama."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pi_llama"


class TextDataModule(L.LightningDataModule):
    """Documents -> tokenizer -> cached token files -> shuffled windows of seq_len + 1 tokens."""

    def __init__(
        self,
        *,
        source: str = "shakespeare",
        path: str | None = None,
        text_field: str = "text",
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_revision: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        batch_size: int = 16,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        passkey_share: float = 0.0,
        passkey_max_tokens: int | None = None,
        seq_len: int,
        seed: int = 0,
        accumulate_grad_batches: int = 1,
    ) -> None:
        """Store and sanity-check the settings; no file or data work happens here.

        passkey_share > 0 mixes answered passkey prompts (data/synthetic_passkey.py) of at most
        passkey_max_tokens tokens (None: seq_len) into the train split, as that share of its tokens.
        accumulate_grad_batches is the trainer's: training epochs end on whole optimizer steps.
        """
        super().__init__()
        sources.check_source(source)
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("accumulate_grad_batches", accumulate_grad_batches, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise DataError(f"data setting {name}={value!r} is invalid; use an integer >= {low}")
        if isinstance(passkey_share, bool) or not isinstance(passkey_share, (int, float)) or not 0 <= passkey_share < 1:
            raise DataError(f"data.passkey_share={passkey_share!r} must be a fraction in [0, 1), e.g. 0.1 (0: none)")
        if passkey_max_tokens is not None and (not isinstance(passkey_max_tokens, int) or passkey_max_tokens < 1):
            raise DataError(f"data.passkey_max_tokens={passkey_max_tokens!r} must be a positive integer (null: seq_len)")
        if tokenizer is None and (not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE):
            raise DataError(
                f"vocab_size={vocab_size!r} is too small to train a tokenizer; use at least {MIN_VOCAB_SIZE}"
            )
        self.save_hyperparameters()
        self.source = source
        self.path = path
        self.text_field = text_field
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.hf_revision = hf_revision
        self.tokenizer_path = tokenizer
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seq_len = seq_len
        self.seed = seed
        self.passkey_share = float(passkey_share)
        self.passkey_max_tokens = passkey_max_tokens or seq_len
        if self.passkey_share > 0 and seq_len % self.passkey_max_tokens:
            # Placed passkey documents fill aligned blocks of passkey_max_tokens; other window lengths cut some.
            log.warning("seq_len=%d is not a multiple of data.passkey_max_tokens=%d: some passkey documents will be "
                        "split between two training windows; use a multiple to keep each whole.",
                        seq_len, self.passkey_max_tokens)
        self._tokenizer: Tokenizer | None = None
        self._identity: dict[str, Any] | None = None
        self._documents: dict[str, list[str]] = {}  # raw texts by split, while building caches
        self._reported: set[str] = set()  # splits found in the cache (said once)
        self._token_dir: Path | None = None
        self._stores: dict[str, TokenStore] = {}
        self._datasets: dict[str, PackedWindows] = {}
        self._samples_seen = 0  # global training samples consumed: the resumable data position

    # -- preparation -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build (or find) the tokenizer and every split's token cache; safe to call repeatedly."""
        self._build_splits(SPLITS)

    def setup(self, stage: str | None = None) -> None:
        """Open the token cache and the windowed datasets the stage needs (building only those splits)."""
        wanted = _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS
        self._build_splits(wanted)  # outside a Trainer, or a rank that skipped prepare_data
        for split in wanted:
            if split not in self._datasets:
                self._datasets[split] = PackedWindows(self.store(split), self.seq_len, split)
        if "train" in self._datasets and len(self._datasets["train"]) < self.batch_size:
            n = len(self._datasets["train"])
            raise DataError(
                f"the train split has {n} windows of seq_len + 1 = {self.seq_len + 1} tokens, fewer than "
                f"batch_size={self.batch_size}, so an epoch would be empty; lower batch_size or seq_len"
            )

    def prepare(self) -> TextDataModule:
        """prepare_data() + setup() for use outside a Trainer; returns self."""
        self.prepare_data()
        self.setup()
        return self

    # -- accessors ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: the configured file, or the project's own (trained once and cached)."""
        if self._tokenizer is None:
            self._tokenizer = self._resolve_tokenizer()
        return self._tokenizer

    @property
    def token_dir(self) -> Path:
        """<cache_dir>/tokens/<key> for this tokenizer and source."""
        if self._token_dir is None:
            key = cache_key(self.tokenizer.fingerprint, self._cache_identity())
            self._token_dir = self.cache_dir / "tokens" / key
        return self._token_dir

    def store(self, split: str) -> TokenStore:
        """The memory-mapped tokens of `split` ("train", "validation" or "test")."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        if split not in self._stores:
            self._build_splits((split,))
            self._stores[split] = TokenStore(self.token_dir, split)
        return self._stores[split]

    def documents(self, split: str) -> list[np.ndarray]:
        """Token ids of every document of `split` (BOS ... EOS each), e.g. for sliding-window perplexity.

        With a passkey mix, the train split's pieces are not documents: corpus documents are cut where
        prompts were placed between them. Validation and test never have prompts.
        """
        return self.store(split).documents()

    def dataset(self, split: str) -> PackedWindows:
        """The packed windows of `split`."""
        if split not in self._datasets:
            self._datasets[split] = PackedWindows(self.store(split), self.seq_len, split)
        return self._datasets[split]

    # -- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded), full batches only, this rank's share, from the current data position."""
        rank, world_size = self._data_parallel_rank()
        n, per_step = len(self.dataset("train")), self.batch_size * self.accumulate_grad_batches
        sampler = ResumableSampler(n, self.seed, self.samples_seen, rank, world_size, per_step)
        if len(sampler) == 0:  # Lightning would end the run at once, with an info line, and save an untrained model
            raise DataError(
                f"the train split has {n} windows of seq_len + 1 = {self.seq_len + 1} tokens, fewer than one optimizer "
                f"step takes (batch_size {self.batch_size} x accumulate_grad_batches {self.accumulate_grad_batches} x "
                f"{world_size} processes = {per_step * world_size}); lower batch_size, seq_len or the number of devices"
            )
        generator = torch.Generator().manual_seed(self.seed)  # worker seeds only; the order is the sampler's
        return self._loader(self.dataset("train"), self.batch_size, sampler=sampler, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order."""
        return self._loader(self.dataset("validation"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test windows in order."""
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def _loader(self, dataset: PackedWindows, batch_size: int, **kwargs: Any) -> DataLoader:
        """A DataLoader with this module's worker settings."""
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    # -- resumable position ------------------------------------------------------------------

    def samples_seen(self) -> int:
        """Global training samples consumed so far (all ranks, all passes)."""
        return self._samples_seen

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts each training batch as it goes to the step: checkpoints are only written after
        a step, so the count saved with one is exactly the data that checkpoint has trained on."""
        if self.trainer is not None and self.trainer.training:
            self._samples_seen += int(batch.shape[0]) * self._data_parallel_rank()[1]
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position, saved in every checkpoint, with what it is a position in."""
        return {"samples_seen": self._samples_seen, "seed": self.seed, "order": DATA_ORDER, "tokens": self.token_dir.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position (before Lightning asks for the train loader)."""
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("resuming with seed=%s but the checkpoint's data order used seed=%s", self.seed, state_dict["seed"])
        if state_dict.get("order") != DATA_ORDER:  # not recorded before 2026-11-27, when the order also changed
            log.warning("the checkpoint's data position does not say which data order it counts in (saved before "
                        "2026-11-27?); from the second pass on, this run may read another order than the interrupted one")
        saved_tokens = state_dict.get("tokens")
        if saved_tokens is not None and saved_tokens != self.token_dir.name:
            log.warning("the checkpoint's data position counts windows of token cache %s, this run reads %s (another "
                        "corpus, tokenizer or passkey recipe): training goes on from the same count, in other data",
                        saved_tokens, self.token_dir.name)
        self._samples_seen = int(state_dict.get("samples_seen", 0))

    def _data_parallel_rank(self) -> tuple[int, int]:
        """(rank, number of data-parallel replicas) from the Trainer's strategy; (0, 1) outside one."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if not kwargs:
            return 0, 1
        return int(kwargs["rank"]), int(kwargs["num_replicas"])

    # -- internals ---------------------------------------------------------------------------

    def _source_identity(self) -> dict[str, Any]:
        """The source identity, computed once (it stats every file of a text_dir)."""
        if self._identity is None:
            self._identity = sources.source_identity(
                self.source, self.path, self.text_field, self.hf_name, self.hf_config, self.hf_revision
            )
        return self._identity

    def _cache_identity(self) -> dict[str, Any]:
        """What the token cache holds: the source, plus the synthetic passkey mix when there is one.

        The tokenizer is keyed by the source alone, so a passkey mix reuses the corpus' tokenizer.
        """
        identity = dict(self._source_identity())
        if self.passkey_share > 0:
            identity["passkey"] = {"share": self.passkey_share, "max_tokens": self.passkey_max_tokens, "seed": self.seed,
                                   "recipe": PASSKEY_RECIPE}
        return identity

    def _build_splits(self, splits: Sequence[str]) -> None:
        """Tokenize those of `splits` the cache does not hold yet, one process at a time (torchrun's ranks)."""
        directory = self.token_dir
        todo = [split for split in splits if not is_complete(directory, split)]
        for split in splits:
            if split not in todo and split not in self._reported:
                log.info("using cached tokens at %s (%s split)", directory, split)
                self._reported.add(split)
        for split in todo:
            with exclusive_build(directory / f"{split}.lock", f"the {split} split's tokens"):
                if is_complete(directory, split, warn=False):  # another process built it while this one waited
                    continue
                log.info("tokenizing the %s split of %s with tokenizer %s into %s", split, self.source,
                         self.tokenizer.fingerprint, directory)
                placement = self._passkey_placement() if split == "train" else None
                write_split(directory, split, self._load_documents(todo)[split], self.tokenizer,
                            self._cache_identity(), placement)
        self._documents = {}  # the raw texts are only needed to build caches; free them

    def _passkey_placement(self) -> BlockPlacement | None:
        """The passkey share to place into the train split (never validation/test), or None without a mix."""
        if self.passkey_share == 0:
            return None
        train = self._load_documents(("train",))["train"]
        corpus_tokens = sum(len(ids) for ids in encoded(train, self.tokenizer))
        # Sized from a sample: the mean length of the documents the generator makes.
        sample = passkey_documents(self.tokenizer, 64, self.passkey_max_tokens, self.seed)
        count = count_for_share(self.passkey_share, corpus_tokens, sum(map(len, sample)) / len(sample))
        # Compact arrays, not lists of Python ints: a share of a large corpus is many documents.
        extra = [np.asarray(ids, dtype=np.int32) for ids in passkey_documents(self.tokenizer, count, self.passkey_max_tokens, self.seed)]
        log.info("placing %d passkey documents (<= %d tokens each, %.0f%% of train tokens) into the train split",
                 count, self.passkey_max_tokens, 100 * self.passkey_share)
        return BlockPlacement(extra, spread_offsets(count, corpus_tokens, self.seed), self.passkey_max_tokens)

    def _load_documents(self, splits: Sequence[str]) -> dict[str, list[str]]:
        """Raw document texts of `splits` (and of any split loaded before), each loaded at most once per build."""
        missing = [split for split in splits if split not in self._documents]
        if missing and self.source != "hf":
            # A local corpus is read whole whatever is asked (a document's split depends on every name): keep every
            # split, or tokenizing validation after training the tokenizer on train would read it all again.
            missing = [split for split in SPLITS if split not in self._documents]
        if missing:
            log.info("loading the %s documents of source %s", " and ".join(missing), self.source)
            self._documents.update(sources.load_documents(
                self.source, self.path, self.text_field, self.hf_name, self.hf_config, self.hf_revision, splits=missing
            ))
        return self._documents

    def _resolve_tokenizer(self) -> Tokenizer:
        """Load the configured tokenizer, or load/train the project's own on the train split."""
        if self.tokenizer_path is not None:
            from data.tiktoken_tokenizer import load_tokenizer  # sentencepiece, or LLaMA 3's tiktoken file

            tok = load_tokenizer(self.tokenizer_path)
            log.info("using tokenizer %s (%d pieces, fingerprint %s)", tok.path, tok.vocab_size, tok.fingerprint)
            return tok
        material = {"recipe": TOKENIZER_RECIPE, "source": self._source_identity(), "vocab_size": self.vocab_size}
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:12]
        path = self.cache_dir / "tokenizers" / f"{self.source}-{digest}-v{self.vocab_size}.model"
        if path.is_file():
            tok = Tokenizer.load(path)
            log.info("using cached tokenizer at %s", path)
            return tok
        with exclusive_build(path.with_suffix(".lock"), f"the tokenizer {path.name}"):
            if path.is_file():  # another process trained it while this one waited
                return Tokenizer.load(path)
            log.info("training a %d-piece tokenizer on the %s train split", self.vocab_size, self.source)
            return train_tokenizer(self._load_documents(("train",))["train"], path, self.vocab_size)
