"""A/B measurements of the speed levers tried on training and evaluation, kept or rejected.

Each group times its variants interleaved in one process, so they share the machine's load, and
reports every variant relative to the first one of its group. docs/benchmarks.md records a run.

Run from the repository root:

    .venv/bin/python benchmarks/levers.py --threads 1 --out docs/benchmark-levers.md
"""

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from timing import REPO_ROOT, Case, machine_facts, markdown_table, measure_interleaved, paired_ratio

sys.path.insert(0, str(REPO_ROOT))  # estinet is used from the clone, not installed

from estinet.data import AdditionData, build_addition_data  # noqa: E402
from estinet.methods import EstiNet  # noqa: E402
from throughput import compose_configs, new_method  # noqa: E402

log = logging.getLogger("levers")


def extractor_step(extractor: torch.nn.Module, images: torch.Tensor):
    def run() -> int:
        extractor.zero_grad(set_to_none=True)
        extractor(images).sum().backward()
        return len(images)

    return run


def extractor_forward(extractor: torch.nn.Module, images: torch.Tensor, batch_images: int):
    def run() -> int:
        with torch.inference_mode():
            for start in range(0, len(images), batch_images):
                torch.softmax(extractor(images[start : start + batch_images]), dim=-1)
        return len(images)

    return run


def method_step(method, data: AdditionData, batch_size: int, seed: int):
    """Return a function that runs one training step on a random batch, as training does."""
    lists = data.train_lists
    generator = torch.Generator().manual_seed(seed)
    method.train()

    def run() -> int:
        rows = torch.randint(0, len(lists), (batch_size,), generator=generator)
        images, sums = lists.batch(rows)
        method.train_step(images, sums, None)
        return images.shape[0] * images.shape[1]

    return run


def with_threads(count: int, run):
    def wrapped() -> int:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            return run()
        finally:
            torch.set_num_threads(previous)

    return wrapped


def group_table(title: str, cases: list[Case], repeats: int, unit: str) -> str:
    results = measure_interleaved(cases, repeats, log=log.info)
    first = results[cases[0].name]
    rows = [
        [name, f"{result.wall_median:,.0f}", f"{result.cpu_median:,.0f}",
         f"{paired_ratio(result, first, 'wall'):.3f}", f"{paired_ratio(result, first, 'cpu'):.3f}"]
        for name, result in results.items()
    ]
    header = ["variant", f"{unit} (wall)", f"{unit} per CPU-second", "vs first (wall)",
              "vs first (CPU)"]
    return f"### {title}\n\n{markdown_table(header, rows)}\n"


def per_call_microseconds(function, calls: int = 2000) -> float:
    function()
    started = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's default, one per core)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed rounds per group (default: 7)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile on the extractor (adds about a minute)")
    args = parser.parse_args()
    # torch.backends.mkldnn.flags() warns about a GPU-only setting on every use.
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    facts = machine_facts()

    configs = compose_configs([])
    cfg = configs["estinet offline"]
    data = build_addition_data(cfg.data)
    seed, batch_size = int(cfg.seed), int(cfg.train.batch_size)
    method = new_method(cfg, data)
    train_batch = data.train_lists.batch(torch.arange(batch_size))[0].flatten(0, 1).contiguous()
    test_images = data.test_images.images[:8192].contiguous()
    repeats = args.repeats
    sections = []

    # Memory format of the extractor's conv weights (inputs have one channel, so only the weights
    # decide the format of every later activation).
    nchw = copy.deepcopy(method.extractor).to(memory_format=torch.contiguous_format)
    nhwc = copy.deepcopy(method.extractor).to(memory_format=torch.channels_last)
    sections.append(group_table("Extractor memory format, training batch forward+backward", [
        Case("contiguous (NCHW)", extractor_step(nchw, train_batch), 10, 3),
        Case("channels_last (NHWC)", extractor_step(nhwc, train_batch), 10, 3),
    ], repeats, "images/s"))
    contiguous_method = new_method(cfg, data)
    contiguous_method.extractor.to(memory_format=torch.contiguous_format)
    sections.append(group_table("Extractor memory format, EstiNet offline step", [
        Case("contiguous (NCHW)", method_step(contiguous_method, data, batch_size, seed), 10, 3),
        Case("channels_last (NHWC)",
             method_step(new_method(cfg, data), data, batch_size, seed), 10, 3),
    ], repeats, "images/s"))
    nchw.eval()
    nhwc.eval()
    sections.append(group_table("Extractor memory format, forward in batches of 512", [
        Case("contiguous (NCHW)", extractor_forward(nchw, test_images, 512), 1, 1),
        Case("channels_last (NHWC)", extractor_forward(nhwc, test_images, 512), 1, 1),
    ], repeats, "images/s"))

    # Images per forward pass during evaluation. Smaller batches keep the activations in cache.
    sections.append(group_table("Evaluation batch size (channels_last extractor)", [
        Case(f"{size} images", extractor_forward(nhwc, test_images, size), 1, 1)
        for size in (4096, 2048, 1024, 512, 256)
    ], repeats, "images/s"))

    # Intra-op threads, switched per case within the process.
    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores})
    nhwc.train()
    sections.append(group_table("Threads, extractor forward+backward", [
        Case(f"{count} thread(s)", with_threads(count, extractor_step(nhwc, train_batch)), 5, 2)
        for count in thread_counts
    ], repeats, "images/s"))

    # Adam implementations in the whole EstiNet step.
    adam_cases = []
    for label, options in (("for-loop (torch's CPU default)", {"foreach": False, "fused": None}),
                           ("foreach", {"foreach": True, "fused": None}),
                           ("fused", {"foreach": None, "fused": True})):
        variant = new_method(cfg, data)
        for group in variant.optimizers["extractor"].param_groups:
            group.update(options)
        adam_cases.append(Case(label, method_step(variant, data, batch_size, seed), 10, 3))
    sections.append(group_table("Adam in the EstiNet offline step", adam_cases, repeats,
                                "images/s"))

    # Gathering the images of one training batch of lists from the split.
    lists = data.train_lists
    rows = torch.randint(0, len(lists), (batch_size,),
                         generator=torch.Generator().manual_seed(seed))

    def gather_advanced() -> int:
        images = lists.split.images[lists.indices[rows]]
        return images.shape[0] * images.shape[1]

    def gather_index_select() -> int:
        positions = lists.indices.index_select(0, rows)
        images = lists.split.images.index_select(0, positions.flatten())
        return images.shape[0]

    sections.append(group_table("Gathering a training batch", [
        Case("advanced indexing", gather_advanced, 200, 20),
        Case("index_select", gather_index_select, 200, 20),
    ], repeats, "images/s"))

    # The estimator's LSTM: oneDNN kernel (default on CPU) or ATen's own.
    estimator = copy.deepcopy(method.estimator).eval()
    logits = torch.randn(32, 10, 10, requires_grad=True)

    def estimator_step(use_onednn: bool):
        def run() -> int:
            logits.grad = None
            with torch.backends.mkldnn.flags(enabled=use_onednn):
                outputs = estimator(torch.softmax(logits, dim=-1))
            outputs.sum().backward()
            return 32 * 10
        return run

    sections.append(group_table("Estimator LSTM kernel, forward+backward of 32 lists of k=10", [
        Case("oneDNN", estimator_step(True), 20, 5),
        Case("ATen (oneDNN disabled)", estimator_step(False), 20, 5),
    ], repeats, "list slots/s"))

    # Per-step costs that need no A/B run: one call each, in CPU microseconds.
    loss = torch.tensor(1.5)
    hybrid = new_method(configs["estinet hybrid"], data)
    assert isinstance(hybrid, EstiNet)

    def toggle_estimator_grads() -> None:
        for parameter in hybrid.estimator.parameters():
            parameter.requires_grad_(True)
        for parameter in hybrid.estimator.parameters():
            parameter.requires_grad_(False)

    step_run = method_step(new_method(cfg, data), data, batch_size, seed)
    step_us = per_call_microseconds(step_run, calls=30)
    micro_rows = [
        ["float(loss.detach()) (StepResult)",
         f"{per_call_microseconds(lambda: float(loss.detach())):.1f}"],
        ["requires_grad_ on and off, all estimator parameters (online, hybrid)",
         f"{per_call_microseconds(toggle_estimator_grads):.1f}"],
        ["whole EstiNet offline step, for scale", f"{step_us:.0f}"],
    ]
    sections.append("### Per-step costs without an A/B run\n\n"
                    + markdown_table(["operation", "CPU microseconds per call"], micro_rows) + "\n")

    if args.compile:
        started = time.perf_counter()
        compiled_nchw = torch.compile(copy.deepcopy(nchw).train())
        extractor_step(compiled_nchw, train_batch)()
        compiled_nhwc = torch.compile(copy.deepcopy(nhwc))
        extractor_step(compiled_nhwc, train_batch)()
        compile_seconds = time.perf_counter() - started
        sections.append(group_table(
            "torch.compile, extractor forward+backward "
            f"(compiling both took {compile_seconds:.0f} s)", [
                Case("eager, channels_last", extractor_step(nhwc, train_batch), 10, 3),
                Case("compiled, contiguous", extractor_step(compiled_nchw, train_batch), 10, 3),
                Case("compiled, channels_last", extractor_step(compiled_nhwc, train_batch), 10, 3),
            ], repeats, "images/s"))

    facts["load average (1, 5, 15 min) at end"] = ", ".join(
        f"{value:.2f}" for value in os.getloadavg()
    )
    report = "\n".join([
        "# Speed levers, A/B results", "",
        "Written by benchmarks/levers.py. docs/benchmarks.md explains the figures.", "",
        "## Machine", "", *(f"- {key}: {value}" for key, value in facts.items()),
        "", "## Levers", "", *sections,
    ])
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
