"""Fine-tuning an OpenCLIP model on image+caption pairs with OpenCLIP's contrastive loss, or
training a small architecture from scratch. Prints retrieval recall@1/5 on a held-out split
before and after, and writes a checkpoint that OpenCLIP's own loader reads."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import torch
from PIL import Image
from tqdm import tqdm

from imgembed.errors import ImgembedError
from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.images.sources import ImageSource, read_source
from imgembed.models.names import ModelSpec, parse_model_spec
from imgembed.settings import Settings
from imgembed.worker.pytorch.embedding import LoadedModel, load_model

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)


class TrainingDataError(ImgembedError, ValueError):
    """The pairs given cannot train anything: too few, or a source that cannot be read at all."""


@dataclass(frozen=True)
class Pair:
    caption: str
    source: ImageSource | None = None
    image: Image.Image | None = None  # in memory (generated data)

    def load(self, settings: Settings) -> Image.Image:
        if self.image is not None:
            return self.image
        assert self.source is not None
        return decode_image(read_source(self.source, settings), settings)


@dataclass
class FinetuneResult:
    checkpoint: Path
    recall_before: dict[str, float]
    recall_after: dict[str, float]
    losses: list[float] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # pairs left out, by the reason class


def pairs_from_csv(path: Path) -> list[Pair]:
    """A CSV with a header naming a path (or uri) column and a caption column."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = {name.lower(): name for name in reader.fieldnames or []}
        path_field = fields.get("path") or fields.get("uri") or fields.get("file")
        caption_field = fields.get("caption") or fields.get("text")
        if not path_field or not caption_field:
            raise TrainingDataError(f"{path}: needs a header with a path (or uri) column and a caption (or text) column")
        base = path.parent
        pairs = []
        for row in reader:
            location = row[path_field]
            if "://" not in location and not Path(location).is_absolute():
                location = str((base / location).resolve())
            pairs.append(Pair(row[caption_field], ImageSource(uri=location)))
    return pairs


def pairs_from_table(connection: psycopg.Connection, table: str, image_column: str, text_column: str) -> list[Pair]:
    from psycopg import sql

    kind = connection.execute(
        "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s "
        "AND NOT attisdropped", (table, image_column)
    ).fetchone()
    if kind is None:
        raise TrainingDataError(f"column {image_column!r} does not exist in table {table}")
    schema_name, _, table_name = table.rpartition(".")
    relation = sql.Identifier(schema_name, table_name) if schema_name else sql.Identifier(table_name)
    statement = sql.SQL("SELECT {}, {} FROM {} WHERE {} IS NOT NULL AND {} IS NOT NULL").format(
        sql.Identifier(image_column), sql.Identifier(text_column), relation,
        sql.Identifier(image_column), sql.Identifier(text_column),
    )
    pairs = []
    for image_value, caption in connection.execute(statement):
        source = ImageSource(content=bytes(image_value)) if kind[0] == "bytea" else ImageSource(uri=str(image_value))
        pairs.append(Pair(str(caption), source))
    return pairs


def synthetic_pairs(count: int, seed: int = 0) -> list[Pair]:
    from imgembed.training.synthetic import random_shapes

    rng = random.Random(seed + 1)
    return [Pair(shape.caption_variant(rng), image=shape.image) for shape in random_shapes(count, seed=seed)]


def readable_pairs(
    pairs: Sequence[Pair], settings: Settings, pool: ThreadPoolExecutor, *, show_progress: bool = False
) -> tuple[list[Pair], Counter[str]]:
    """The pairs whose image reads and decodes, and a count of the others by reason class (the
    same classes a failed row's error starts with). One bad row never stops a training run."""

    def check(pair: Pair) -> str | None:
        try:
            pair.load(settings)
        except ImageError as error:
            log.info("skipping %s", error)
            return error.reason
        return None

    readable: list[Pair] = []
    skipped: Counter[str] = Counter()
    outcomes = pool.map(check, pairs)
    for pair, reason in tqdm(zip(pairs, outcomes), total=len(pairs), desc="reading images", unit="image",
                             disable=not show_progress):
        if reason is None:
            readable.append(pair)
        else:
            skipped[reason] += 1
    return readable, skipped


def split_pairs(pairs: Sequence[Pair], holdout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    held = max(1, int(len(shuffled) * holdout)) if holdout > 0 else 0
    return shuffled[held:], shuffled[:held]


def _pixels(model: LoadedModel, pairs: Sequence[Pair], settings: Settings, pool: ThreadPoolExecutor) -> torch.Tensor:
    return torch.stack(list(pool.map(lambda pair: model.preprocess(pair.load(settings)), pairs)))


@torch.inference_mode()
def retrieval_recall(
    model: LoadedModel, pairs: Sequence[Pair], settings: Settings, pool: ThreadPoolExecutor, batch_size: int = 256
) -> dict[str, float]:
    """Image-to-text retrieval over the held-out pairs: recall@k counts an image as found when one
    of its k best captions is its own caption text."""
    if not pairs:
        return {"recall@1": float("nan"), "recall@5": float("nan")}
    model.model.eval()
    image_vectors = torch.cat([
        torch.from_numpy(model.embed_pixels(_pixels(model, pairs[i : i + batch_size], settings, pool)))
        for i in range(0, len(pairs), batch_size)
    ])
    captions = sorted({pair.caption for pair in pairs})
    text_vectors = torch.from_numpy(model.embed_texts(captions))
    truth = torch.tensor([captions.index(pair.caption) for pair in pairs])
    ranking = (image_vectors @ text_vectors.T).argsort(dim=1, descending=True)
    return {
        f"recall@{k}": float((ranking[:, :k] == truth[:, None]).any(dim=1).float().mean())
        for k in (1, 5)
    }


def _optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "logit_scale" in name or "embedding" in name else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate
    )


def train(
    model: LoadedModel,
    pairs: Sequence[Pair],
    settings: Settings,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    import open_clip

    torch.manual_seed(seed)
    shuffler = random.Random(seed)
    network = model.model
    network.train()
    optimizer = _optimizer(network, learning_rate)
    steps_per_epoch = max(1, len(pairs) // batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))),
    )
    loss_function = open_clip.ClipLoss()
    losses: list[float] = []
    order = list(range(len(pairs)))
    with ThreadPoolExecutor(settings.decode_threads) as pool, tqdm(
        total=total_steps, desc="training", unit="step", disable=not show_progress
    ) as progress:
        for _ in range(epochs):
            shuffler.shuffle(order)
            for step in range(steps_per_epoch):
                batch = [pairs[i] for i in order[step * batch_size : (step + 1) * batch_size]]
                images = _pixels(model, batch, settings, pool).to(model.device)
                texts = model.tokenizer([pair.caption for pair in batch]).to(model.device)
                with model._autocast():
                    image_features, text_features, logit_scale = network(images, texts)[:3]
                    loss = loss_function(image_features, text_features, logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    network.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                losses.append(float(loss.detach()))
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    network.eval()
    return losses


def save_checkpoint(model: LoadedModel, path: Path, *, half: bool = True) -> Path:
    """A checkpoint OpenCLIP loads with ``create_model_and_transforms(arch, pretrained=path)``.
    Written beside ``path`` and renamed over it: workers that memory-mapped an earlier file of
    that name keep reading the earlier file, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: (value.half() if half and value.is_floating_point() else value).detach().cpu().contiguous()
        for name, value in model.model.state_dict().items()
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save({"state_dict": state}, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def finetune(
    pairs: Sequence[Pair],
    settings: Settings,
    *,
    model_name: str,
    from_scratch: bool,
    out: Path,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    holdout: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
) -> FinetuneResult:
    spec = parse_model_spec(model_name)
    if from_scratch:  # the architecture with seeded random weights
        spec = ModelSpec(name=spec.architecture, architecture=spec.architecture, pretrained=None)
    with ThreadPoolExecutor(settings.decode_threads) as pool:
        pairs, skipped = readable_pairs(pairs, settings, pool, show_progress=show_progress)
        if len(pairs) < 2:
            left_out = "".join(f"; {count} {reason}" for reason, count in skipped.most_common())
            raise TrainingDataError(f"need at least 2 readable image+caption pairs, got {len(pairs)}{left_out}")
        model = load_model(spec, settings.device, model_dir=settings.models_path)
        train_pairs, held_out = split_pairs(pairs, holdout, seed)
        before = retrieval_recall(model, held_out, settings, pool)
        log.info("held-out recall before: %s", before)
        losses = train(model, train_pairs, settings, epochs=epochs, batch_size=min(batch_size, len(train_pairs)),
                       learning_rate=learning_rate, seed=seed, show_progress=show_progress)
        after = retrieval_recall(model, held_out, settings, pool)
    checkpoint = save_checkpoint(model, out)
    return FinetuneResult(checkpoint, before, after, losses, skipped)
