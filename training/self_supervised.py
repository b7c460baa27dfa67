"""Tuning an image tower without captions (SimCLR): two augmented views of each unlabelled image are
pulled together and pushed away from every other image's views (NT-Xent loss), through a small
projection head that is dropped afterwards. Labels, where the table has them, only measure: a
held-out kNN label accuracy before and after."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from imgembed.images.decode import decode_image
from imgembed.images.image_error import ImageError
from imgembed.images.sources import ImageSource, read_source
from imgembed.models.names import ModelSpec, parse_model_spec
from imgembed.settings import Settings
from imgembed.training.finetune import TrainingDataError, save_checkpoint
from imgembed.worker.pytorch.embedding import LoadedModel, load_model

log = logging.getLogger(__name__)

KNN_K = 5


@dataclass(frozen=True)
class Picture:
    """An unlabelled image to train on; ``label`` (if any) only measures."""

    image: Image.Image
    label: str | None = None


@dataclass
class SelfSupervisedResult:
    checkpoint: Path
    knn_accuracy_before: float  # NaN without labels
    knn_accuracy_after: float
    losses: list[float] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def pictures_from_table(connection: psycopg.Connection, table: str, image_column: str, label_column: str | None,
                        settings: Settings) -> tuple[list[Picture], Counter[str]]:
    """Every readable image of the table (bytea, or a path/URI as workers read it), with its label;
    the others counted by reason class."""
    from psycopg import sql

    columns = [sql.Identifier(image_column), sql.Identifier(label_column) if label_column else sql.NULL]
    # In the images' order, not the heap's: the held-out split (seeded) is then the same every time.
    rows = connection.execute(sql.SQL("SELECT {}, {}::text FROM {} WHERE {} IS NOT NULL ORDER BY 1, 2").format(
        *columns, sql.SQL(table), sql.Identifier(image_column))).fetchall()  # table: checked by the CLI as regclass
    pictures, skipped = [], Counter[str]()
    for value, label in rows:
        source = ImageSource(content=bytes(value)) if isinstance(value, (bytes, memoryview)) else ImageSource(uri=value)
        try:
            pictures.append(Picture(decode_image(read_source(source, settings), settings), label))
        except ImageError as error:
            skipped[error.reason] += 1
    return pictures, skipped


def _views(size: int) -> transforms.Compose:
    """One random view of a picture, as SimCLR makes them (crops, flips, colour, grey)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over N pairs of views: each view's partner against the 2N - 2 other views."""
    views = torch.nn.functional.normalize(torch.cat([first, second]), dim=-1)
    similarity = views @ views.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    count = first.shape[0]
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    return torch.nn.functional.cross_entropy(similarity, partner)


@torch.inference_mode()
def _embed(model: LoadedModel, pictures: Sequence[Picture]) -> torch.Tensor:
    model.model.eval()
    return torch.cat([torch.from_numpy(model.embed_pixels(torch.stack([model.preprocess(p.image)
                                                                         for p in pictures[i:i + 256]])))
                      for i in range(0, len(pictures), 256)])


def knn_accuracy(model: LoadedModel, reference: Sequence[Picture], held_out: Sequence[Picture]) -> float:
    """Share of held-out pictures whose label is the most common among their KNN_K nearest
    reference pictures (cosine); NaN without labels."""
    reference = [picture for picture in reference if picture.label is not None]
    held_out = [picture for picture in held_out if picture.label is not None]
    if not reference or not held_out:
        return float("nan")
    nearest = (_embed(model, held_out) @ _embed(model, reference).T).topk(min(KNN_K, len(reference)), dim=1).indices
    right = 0
    for picture, neighbours in zip(held_out, nearest.tolist()):
        votes = Counter(reference[index].label for index in neighbours)
        right += votes.most_common(1)[0][0] == picture.label
    return right / len(held_out)


def train(model: LoadedModel, pictures: Sequence[Picture], *, epochs: int, batch_size: int, learning_rate: float,
          temperature: float, seed: int, show_progress: bool = True) -> list[float]:
    """SimCLR on the image tower (the text tower, if any, is left as it is)."""
    torch.manual_seed(seed)
    shuffler = random.Random(seed)
    visual = model.model.visual
    dim = model.dim
    head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, dim))
    parameters = [*visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = max(1, len(pictures) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    augment, to_pixels = _views(model.input_size), model.preprocess
    losses: list[float] = []
    order = list(range(len(pictures)))
    visual.train()
    with ThreadPoolExecutor(4) as pool, tqdm(total=epochs * steps_per_epoch, desc="self-supervised", unit="step",
                                             disable=not show_progress) as progress:
        for _ in range(epochs):
            shuffler.shuffle(order)
            for step in range(steps_per_epoch):
                batch = [pictures[i].image for i in order[step * batch_size:(step + 1) * batch_size]]
                # The random views in this thread, in order (torchvision draws from torch's one
                # generator: threads would take its numbers in any order); their pixels in the pool.
                first, second = (torch.stack(list(pool.map(to_pixels, [augment(image) for image in batch])))
                                 for _ in range(2))
                loss = nt_xent(head(visual(first)), head(visual(second)), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
    visual.eval()
    return losses


def tune(pictures: Sequence[Picture], settings: Settings, *, model_name: str, from_scratch: bool, out: Path,
         epochs: int, batch_size: int, learning_rate: float, temperature: float = 0.2, holdout: float = 0.2,
         seed: int = 0, show_progress: bool = True) -> SelfSupervisedResult:
    """Train the model's image tower on the pictures (labels unused), measure kNN label accuracy on
    a held-out share before and after, and write a checkpoint OpenCLIP reads."""
    spec = parse_model_spec(model_name)
    if spec.is_timm:
        raise TrainingDataError(f"model {model_name}: self-supervised tuning takes an OpenCLIP architecture")
    if from_scratch:
        spec = ModelSpec(name=spec.architecture, architecture=spec.architecture, pretrained=None)
    if len(pictures) < 2 * KNN_K:
        raise TrainingDataError(f"need at least {2 * KNN_K} readable images, got {len(pictures)}")
    shuffled = list(pictures)
    random.Random(seed).shuffle(shuffled)
    held = max(1, int(len(shuffled) * holdout))
    held_out, training = shuffled[:held], shuffled[held:]
    model = load_model(spec, "cpu" if settings.device == "auto" else settings.device, model_dir=settings.models_path)
    before = knn_accuracy(model, training, held_out)
    log.info("held-out kNN accuracy before: %.3f", before)
    losses = train(model, training, epochs=epochs, batch_size=min(batch_size, len(training)),
                   learning_rate=learning_rate, temperature=temperature, seed=seed, show_progress=show_progress)
    after = knn_accuracy(model, training, held_out)
    return SelfSupervisedResult(save_checkpoint(model, out), before, after, losses)


def nan_or(value: float) -> str:
    return "n/a (no labels)" if math.isnan(value) else f"{value:.3f}"
