"""Print torch.profiler's operator table for training steps of a method on real MNIST lists.

Run from the repository root, with Hydra overrides of conf/train.yaml after the options:

    .venv/bin/python benchmarks/profile_step.py --threads 1 --steps 30 estimator.training=hybrid
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from throughput import compose_configs, new_method
from timing import REPO_ROOT, machine_facts

sys.path.insert(0, str(REPO_ROOT))  # estinet is used from the clone, not installed

from estinet.data import build_addition_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides of conf/train.yaml, e.g. model=nalu")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's default, one per core)")
    parser.add_argument("--steps", type=int, default=30,
                        help="profiled training steps, after 5 untimed ones (default: 30)")
    parser.add_argument("--contiguous", action="store_true",
                        help="store the extractor's conv weights contiguous (NCHW) instead of "
                             "channels-last, as before the switch to channels-last")
    parser.add_argument("--rows", type=int, default=25,
                        help="operators shown, by self CPU time (default: 25)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cfg = compose_configs(args.overrides)["estinet offline"]
    data = build_addition_data(cfg.data)
    method = new_method(cfg, data)
    if args.contiguous:
        method.extractor.to(memory_format=torch.contiguous_format)
    method.set_epoch(0)
    method.train()
    lists, batch_size = data.train_lists, int(cfg.train.batch_size)
    generator = torch.Generator().manual_seed(int(cfg.seed))

    def step() -> None:
        rows = torch.randint(0, len(lists), (batch_size,), generator=generator)
        images, sums = lists.batch(rows)
        labels = lists.digit_labels(rows) if method.uses_digit_labels else None
        method.train_step(images, sums, labels)

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()

    for key, value in machine_facts().items():
        print(f"{key}: {value}")
    print(f"{args.steps} steps of {batch_size} lists x k={lists.k}, overrides: "
          f"{' '.join(args.overrides) or 'none'}")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
