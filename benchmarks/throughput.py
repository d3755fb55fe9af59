"""Throughput of training steps and k=100 evaluation, measured side by side with two yardsticks.

- Ceiling: the bare argument extractor on pre-built tensors of real MNIST images, forward+backward
  at the shape of a training batch and forward-only at the shape of an evaluation batch. Whatever
  is built around the extractor cannot be faster on the same number of images.
- Reference: the per-image data path of common reimplementations of the experiment. torchvision's
  MNIST dataset with ToTensor and Normalize, a list dataset that loads the k images of a list one by
  one, and a DataLoader with a padding collate feed the same method on the same lists.

Training counts images per second (batch size x k per step). Evaluation counts list slots per
second (lists x k): our evaluation runs each distinct test image through the extractor once and
gathers the outputs per list, so it can exceed the per-image ceiling. The per-slot variant runs
every slot through the extractor, which makes it comparable with the ceiling.

Run from the repository root (docs/benchmarks.md explains the output):

    .venv/bin/python benchmarks/throughput.py --threads 1 --out docs/benchmark-results.md
"""

import argparse
import copy
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from timing import (
    REPO_ROOT,
    Case,
    Measurement,
    machine_facts,
    markdown_table,
    measure_interleaved,
    paired_ratio,
)

sys.path.insert(0, str(REPO_ROOT))  # estinet is used from the clone, not installed

from estinet.blackbox import BlackBox, make_black_box  # noqa: E402
from estinet.data import AdditionData, ListSet, build_addition_data  # noqa: E402
from estinet.evaluation import EVAL_BATCH_IMAGES, evaluate_lists, split_probabilities  # noqa: E402
from estinet.methods import Method, build_method  # noqa: E402
from estinet.train import steps_per_epoch  # noqa: E402

log = logging.getLogger("throughput")

TRAINING_TARGET_OF_CEILING = 0.90
EVALUATION_TARGET_OF_CEILING = 0.90
TRAINING_TARGET_OF_REFERENCE = 1.5
EVALUATION_TARGET_OF_REFERENCE = 3.0


# --------------------------------------------------------------------------- the reference


class ReferenceLists(Dataset):
    """Image lists read image by image from a per-image dataset: (images (k, 1, 28, 28), sum)."""

    def __init__(self, images: Dataset, lists: ListSet) -> None:
        self.images = images
        self.rows = lists.indices.tolist()
        self.sums = lists.sums.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images = [self.images[position][0] for position in self.rows[index]]
        return torch.stack(images), self.sums[index]


def pad_collate(batch: list[tuple[torch.Tensor, int]]):
    """Pad lists of different lengths with zero images: (B, longest k, 1, 28, 28), sums, lengths."""
    images = [item[0] for item in batch]
    lengths = torch.tensor([len(item) for item in images])
    sums = torch.tensor([item[1] for item in batch])
    return pad_sequence(images, batch_first=True), sums, lengths


def reference_loader(
    cfg: DictConfig, lists: ListSet, *, train: bool, batch_size: int, workers: int, seed: int
) -> DataLoader:
    """DataLoader over `lists`, reading MNIST through torchvision with per-image transforms.

    Our training images are the first images of MNIST train and our test images are MNIST test,
    so the list indices address the same images in torchvision's datasets.
    """
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((cfg.data.mean,), (cfg.data.std,))]
    )
    images = torchvision.datasets.MNIST(
        to_absolute_path(cfg.data.root), train=train, download=False, transform=transform
    )
    return DataLoader(
        ReferenceLists(images, lists),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        collate_fn=pad_collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def reference_evaluation(extractor: nn.Module, black_box: BlackBox, loader: DataLoader) -> dict:
    """Score every list slot by slot: extractor on each image, black box on the argmax digits."""
    was_training = extractor.training
    extractor.eval()
    error, slots = 0.0, 0
    with torch.inference_mode():
        for images, sums, lengths in loader:
            batch_size, longest = images.shape[:2]
            logits = extractor(images.flatten(0, 1)).view(batch_size, longest, -1)
            real = torch.arange(longest) < lengths[:, None]  # (B, longest), False on padding
            digits = logits.argmax(-1) * real  # padding counts as digit 0, so it adds nothing
            error += float((black_box(digits).float() - sums).abs().sum())
            slots += int(lengths.sum())
    extractor.train(was_training)
    return {"mae": error / len(loader.dataset), "slots": slots}


# --------------------------------------------------------------------------- our paths


def per_slot_evaluation(method: Method, lists: ListSet, batch_images: int) -> dict[str, float]:
    """Evaluate with every list slot through the extractor, in batches of `batch_images` slots."""
    slots = lists.indices.flatten()
    was_training = method.extractor.training
    method.extractor.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(slots), batch_images):
            images = lists.split.images.index_select(0, slots[start : start + batch_images])
            chunks.append(torch.softmax(method.extractor(images), dim=-1))
    method.extractor.train(was_training)
    # Slot i of the flattened lists is row i of the probabilities.
    slot_lists = ListSet(lists.split, torch.arange(len(slots)).view_as(lists.indices), lists.sums)
    return evaluate_lists(method, torch.cat(chunks), slot_lists)


def training_case(name: str, method: Method, lists: ListSet, batch_size: int, seed: int,
                  steps: int, warmup: int, nonfinite: dict[str, int]) -> Case:
    """Build a case whose unit is one training step as estinet.train runs it: gather, train_step."""
    generator = torch.Generator().manual_seed(seed)

    def row_batches() -> Iterator[torch.Tensor]:
        while True:
            yield from lists.batches(batch_size, generator=generator, shuffle=True)

    rows_iter = row_batches()
    method.set_epoch(0)
    method.train()
    nonfinite[name] = 0

    def step() -> int:
        rows = next(rows_iter)
        images, sums = lists.batch(rows)
        labels = lists.digit_labels(rows) if method.uses_digit_labels else None
        nonfinite[name] += method.train_step(images, sums, labels).nonfinite
        return images.shape[0] * images.shape[1]

    return Case(name, step, units=steps, warmup_units=warmup)


# --------------------------------------------------------------------------- building blocks


def compose_configs(overrides: list[str]) -> dict[str, DictConfig]:
    """Compose conf/train.yaml for each measured method, with the user's overrides last."""
    base = ["device=cpu", "train.progress=false"]
    variants = {
        "estinet offline": ["model=estinet", "estimator.training=offline"],
        "estinet hybrid": ["model=estinet", "estimator.training=hybrid"],
        "nalu": ["model=nalu"],
    }
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        return {
            name: compose(config_name="train", overrides=base + extra + overrides)
            for name, extra in variants.items()
        }


def new_method(cfg: DictConfig, data: AdditionData) -> Method:
    """Build a method with the weights of a fresh run of `cfg.seed`.

    EstiNet's estimator keeps its random initial weights instead of being pretrained (minutes of
    work), which leaves the work per step unchanged. Steps whose loss is non-finite skip their
    backward pass, so they are counted and reported.
    """
    torch.manual_seed(int(cfg.seed))
    total_steps = int(cfg.train.epochs) * steps_per_epoch(
        len(data.train_lists), int(cfg.train.batch_size)
    )
    return build_method(cfg, make_black_box(cfg.black_box), torch.device("cpu"), total_steps,
                        initialize_estimator=False)


def check_reference_images(loader: DataLoader, lists: ListSet) -> float:
    """Return the largest pixel difference between the reference's first list and ours."""
    reference_images, _ = loader.dataset[0]
    ours = lists.split.images[lists.indices[0]]
    return float((reference_images - ours).abs().max())


# --------------------------------------------------------------------------- the measured cases

TRAIN_CEILING = "ceiling: extractor forward+backward, training batch"
NETWORKS = "extractor + frozen estimator forward+backward, training batch"
EVAL_CEILING = "ceiling: extractor forward, evaluation batch"
OUR_EVALUATION = "ours: evaluation"
OUR_PER_SLOT_EVALUATION = "ours: evaluation, every slot through the extractor"


@dataclass
class Workload:
    """The data and settings shared by all cases, and the checks that the cases fill in."""

    configs: dict[str, DictConfig]
    data: AdditionData
    eval_k: int
    steps: int
    warmup: int
    workers: list[int]
    checks: dict[str, dict] = field(default_factory=lambda: {
        "non-finite training steps": {},
        "largest pixel difference, reference vs ours": {},
        "evaluation MAE of each path (same untrained weights)": {},
    })

    @property
    def cfg(self) -> DictConfig:
        return self.configs["estinet offline"]

    @property
    def batch_size(self) -> int:
        return int(self.cfg.train.batch_size)

    @property
    def eval_lists(self) -> ListSet:
        return self.data.test_lists[self.eval_k]


def training_cases(work: Workload) -> list[Case]:
    """Ceilings, our three training steps and the reference step, at the configured batch size."""
    lists, batch_size, seed = work.data.train_lists, work.batch_size, int(work.cfg.seed)
    steps, warmup = work.steps, work.warmup
    methods = {name: new_method(config, work.data) for name, config in work.configs.items()}
    extractor = copy.deepcopy(methods["estinet offline"].extractor).train()
    estimator = copy.deepcopy(methods["estinet offline"].estimator).eval()
    images = lists.batch(torch.arange(batch_size))[0]  # (B, k, 1, 28, 28), real training images
    flat_images = images.flatten(0, 1).contiguous()

    def ceiling_forward_backward() -> int:
        extractor.zero_grad(set_to_none=True)
        extractor(flat_images).sum().backward()
        return len(flat_images)

    def ceiling_forward() -> int:
        with torch.inference_mode():
            extractor(flat_images)
        return len(flat_images)

    def networks_forward_backward() -> int:
        extractor.zero_grad(set_to_none=True)
        logits = extractor(flat_images).view(*images.shape[:2], -1)
        estimator(torch.softmax(logits, dim=-1)).sum().backward()
        return len(flat_images)

    cases = [
        Case(TRAIN_CEILING, ceiling_forward_backward, steps, warmup),
        Case("ceiling: extractor forward, training batch", ceiling_forward, steps, warmup),
        Case(NETWORKS, networks_forward_backward, steps, warmup),
    ]
    nonfinite = work.checks["non-finite training steps"]
    for name, method in methods.items():
        cases.append(training_case(f"ours: {name} step", method, lists, batch_size, seed,
                                   steps, warmup, nonfinite))

    reference_method = new_method(work.cfg, work.data)
    reference_method.set_epoch(0)
    reference_method.train()
    for workers in work.workers:
        loader = reference_loader(work.cfg, lists, train=True, batch_size=batch_size,
                                  workers=workers, seed=seed)
        differences = work.checks["largest pixel difference, reference vs ours"]
        differences["training"] = check_reference_images(loader, lists)
        batches = endless(loader)

        def reference_step(batches=batches) -> int:
            padded, sums, lengths = next(batches)
            # Every list has length k, so the padded batch equals the unpadded one.
            reference_method.train_step(padded, sums, None)
            return int(lengths.sum())

        def drain_prefetched(batches=batches, count=workers * (loader.prefetch_factor or 0)):
            # Workers fill their queue while other cases run. Those batches are taken untimed,
            # so the timed steps pay for every batch they use.
            for _ in range(count):
                next(batches)

        cases.append(Case(reference_training_name(workers), reference_step, steps, warmup,
                          prepare=drain_prefetched if workers else None))
    return cases


def evaluation_cases(work: Workload) -> list[Case]:
    """Ceiling, our evaluation, its per-slot variant and the reference, on the k=eval_k lists."""
    lists = work.eval_lists
    method = new_method(work.cfg, work.data)
    extractor = copy.deepcopy(method.extractor).eval()
    ceiling_images = lists.split.images.index_select(0, lists.indices.flatten()[:EVAL_BATCH_IMAGES])
    slots_per_pass = lists.indices.numel()
    maes = work.checks["evaluation MAE of each path (same untrained weights)"]

    def ceiling_forward() -> int:
        with torch.inference_mode():
            extractor(ceiling_images)
        return len(ceiling_images)

    def our_evaluation() -> int:
        probabilities = split_probabilities(method, lists.split)
        maes["ours"] = evaluate_lists(method, probabilities, lists)["mae"]
        return slots_per_pass

    def our_per_slot_evaluation() -> int:
        maes["ours, per slot"] = per_slot_evaluation(method, lists, EVAL_BATCH_IMAGES)["mae"]
        return slots_per_pass

    # About a tenth of the images of one evaluation pass per round.
    ceiling_units = max(1, slots_per_pass // EVAL_BATCH_IMAGES // 10)
    cases = [
        Case(EVAL_CEILING, ceiling_forward, ceiling_units, 2),
        Case(OUR_EVALUATION, our_evaluation),
        Case(OUR_PER_SLOT_EVALUATION, our_per_slot_evaluation),
    ]
    black_box = make_black_box(work.cfg.black_box)
    for workers in work.workers:
        loader = reference_loader(work.cfg, lists, train=False,
                                  batch_size=reference_lists_per_batch(work.eval_k),
                                  workers=workers, seed=int(work.cfg.seed))
        differences = work.checks["largest pixel difference, reference vs ours"]
        differences["evaluation"] = check_reference_images(loader, lists)

        def run_reference(loader=loader, workers=workers) -> int:
            result = reference_evaluation(method.extractor, black_box, loader)
            maes[f"reference, {workers} workers"] = result["mae"]
            return result["slots"]

        cases.append(Case(reference_evaluation_name(workers), run_reference))
    return cases


def reference_training_name(workers: int) -> str:
    return f"reference: estinet offline step, {workers} workers"


def reference_evaluation_name(workers: int) -> str:
    return f"reference: evaluation, {workers} workers"


def reference_lists_per_batch(k: int) -> int:
    # As many lists as fill one of our evaluation batches, so both run the extractor on batches
    # of the same size.
    return max(1, EVAL_BATCH_IMAGES // k)


# --------------------------------------------------------------------------- report


def render_report(facts: dict[str, str], settings: dict[str, str], work: Workload,
                  training: dict[str, Measurement], evaluation: dict[str, Measurement]) -> str:
    """Build the markdown report: machine, settings, checks, throughput and ratio tables."""
    sections = ["# Throughput benchmark results", "",
                "Written by benchmarks/throughput.py. docs/benchmarks.md explains the figures.", "",
                "## Machine", "", *(f"- {key}: {value}" for key, value in facts.items()), "",
                "## Settings and checks", "",
                *(f"- {key}: {value}" for key, value in settings.items())]
    for title, values in work.checks.items():
        listed = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        sections.append(f"- {title}: {listed}")

    rows = []
    for group, unit, results in (("training", "images/s", training),
                                 ("evaluation", "list slots/s", evaluation)):
        for name, result in results.items():
            rows.append([group, name, f"{result.wall_median:,.0f} {unit}",
                         f"{result.cpu_median:,.0f}"])
    sections += [
        "", "## Throughput", "",
        markdown_table(["group", "measurement", "wall clock", "per CPU-second"], rows), "",
        "Per CPU-second counts the CPU time of the benchmark process only, so it leaves out the "
        "work of DataLoader worker processes.", "",
    ]

    def ratio_row(label, results, top, bottom, target):
        wall = paired_ratio(results[top], results[bottom], "wall")
        cpu = paired_ratio(results[top], results[bottom], "cpu")
        if target is None:
            return [label, f"{wall:.3f}", f"{cpu:.3f}", "-", "-"]
        return [label, f"{wall:.3f}", f"{cpu:.3f}", f">= {target:g}",
                "yes" if wall >= target else "no"]

    ratio_rows = [
        ratio_row(f"{name} step / ceiling", training, f"ours: {name} step", TRAIN_CEILING,
                  TRAINING_TARGET_OF_CEILING)
        for name in work.configs
    ]
    ratio_rows.append(ratio_row("extractor + frozen estimator / ceiling", training, NETWORKS,
                                TRAIN_CEILING, None))
    ratio_rows += [
        ratio_row(f"estinet offline step / reference, {workers} workers", training,
                  "ours: estinet offline step", reference_training_name(workers),
                  TRAINING_TARGET_OF_REFERENCE)
        for workers in work.workers
    ]
    ratio_rows += [
        ratio_row("evaluation / ceiling", evaluation, OUR_EVALUATION, EVAL_CEILING,
                  EVALUATION_TARGET_OF_CEILING),
        ratio_row("evaluation, every slot / ceiling", evaluation, OUR_PER_SLOT_EVALUATION,
                  EVAL_CEILING, EVALUATION_TARGET_OF_CEILING),
    ]
    for workers in work.workers:
        ratio_rows += [
            ratio_row(f"evaluation / reference, {workers} workers", evaluation, OUR_EVALUATION,
                      reference_evaluation_name(workers), EVALUATION_TARGET_OF_REFERENCE),
            ratio_row(f"evaluation, every slot / reference, {workers} workers", evaluation,
                      OUR_PER_SLOT_EVALUATION, reference_evaluation_name(workers), None),
        ]
    sections += [
        "## Ratios", "",
        "Each ratio is the median over rounds of the ratio of two throughputs measured in the "
        "same round. Targets apply to the wall-clock ratio.", "",
        markdown_table(["ratio", "wall clock", "CPU time", "target", "met"], ratio_rows),
    ]
    return "\n".join(sections)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides of conf/train.yaml, e.g. train.batch_size=64")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's default, one per core)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds; each figure is the median over rounds (default: 5)")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="training steps per case and round (default: 10)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed training steps per case before the rounds (default: 3)")
    parser.add_argument("--eval-k", type=int, default=100,
                        help="list length of the evaluation lists (default: 100)")
    parser.add_argument("--eval-lists", type=int,
                        help="number of evaluation lists (default: data.test.num_lists)")
    parser.add_argument("--reference-workers", default="0,2",
                        help="comma-separated DataLoader num_workers to measure (default: 0,2)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    facts = machine_facts()

    configs = compose_configs(args.overrides)
    data_cfg = configs["estinet offline"].data
    if args.eval_lists is not None:
        data_cfg.test.num_lists = args.eval_lists
    data_cfg.test.k = [args.eval_k]
    work = Workload(
        configs=configs,
        data=build_addition_data(data_cfg),
        eval_k=args.eval_k,
        steps=args.train_steps,
        warmup=args.warmup_steps,
        workers=[int(value) for value in args.reference_workers.split(",") if value.strip()],
    )

    cases = training_cases(work)
    log.info("training: %d cases, %d rounds", len(cases), args.repeats)
    training = measure_interleaved(cases, args.repeats, log=log.info)
    cases = evaluation_cases(work)
    log.info("evaluation: %d cases, %d rounds", len(cases), args.repeats)
    evaluation = measure_interleaved(cases, args.repeats, log=log.info)

    facts["load average (1, 5, 15 min) at end"] = ", ".join(
        f"{value:.2f}" for value in os.getloadavg()
    )
    lists, k = work.eval_lists, work.data.train_lists.k
    settings = {
        "training": f"{work.batch_size} lists x k={k} = {work.batch_size * k} images per step, "
                    f"{work.steps} steps per case and round after {work.warmup} warm-up steps",
        "evaluation": f"{len(lists)} test lists x k={args.eval_k} = {lists.indices.numel()} slots "
                      f"over {len(lists.split)} distinct images, extractor batches of "
                      f"{EVAL_BATCH_IMAGES} images, reference batches of "
                      f"{reference_lists_per_batch(args.eval_k)} lists",
        "rounds": f"{args.repeats}, cases interleaved, figures are medians over rounds",
    }
    report = render_report(facts, settings, work, training, evaluation)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
