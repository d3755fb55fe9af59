"""Validation of composed configs: each invalid value is rejected with one line, before any work."""

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from estinet import train
from estinet.checkpoint import config_differences
from estinet.config import validate_pretrain_config, validate_train_config
from estinet.config_keys import unknown_override_message
from estinet.errors import ConfigError
from estinet.runtime import configure_determinism
from estinet.train import run_training

MODELS = sorted(path.stem for path in (REPO_ROOT / "conf" / "model").glob("*.yaml"))
EXPERIMENTS = sorted(path.stem for path in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_shipped_configs_are_valid(model, experiment):
    overrides = [f"model={model}"] + ([f"experiment={experiment}"] if experiment else [])
    validate_train_config(compose_config("train", overrides))


def test_shipped_pretrain_config_is_valid():
    validate_pretrain_config(compose_config("pretrain", []))


# (overrides, text the one-line message must contain)
INVALID_TRAIN_VALUES = [
    (["seed=-1"], "seed=-1 is invalid: expected an integer >= 0, for example seed=0"),
    (["seed=abc"], "seed=abc is invalid: expected an integer >= 0"),
    (["device=gpu"], "device=gpu is invalid: expected auto, cpu, cuda or cuda:N"),
    (["num_threads=0"], "num_threads=0 is invalid: expected an integer >= 1 or null"),
    (["black_box=product"], "black_box=product is invalid: expected one of sum"),
    (["deterministic=maybe"], "deterministic=maybe is invalid: expected true or false"),
    (["resume=missing/last.pt"], "resume=missing/last.pt is invalid: file"),
    (["train.epochs=0"], "train.epochs=0 is invalid: expected an integer >= 1"),
    (["train.epochs=1.5"], "train.epochs=1.5 is invalid: expected an integer >= 1"),
    (["train.batch_size=0"], "train.batch_size=0 is invalid: expected an integer >= 1"),
    (["train.batch_size=-4"], "train.batch_size=-4 is invalid"),
    (["train.lr=0"], "train.lr=0 is invalid: expected a number in (0, "),
    (["train.lr=abc"], "train.lr=abc is invalid"),
    (["train.lr=1e39"], "train.lr=1e+39 is invalid"),
    (["train.schedule=linear"], "train.schedule=linear is invalid: expected one of cosine,"),
    (["train.warmup_fraction=1.0"], "train.warmup_fraction=1.0 is invalid: expected a number in"),
    (["train.min_lr_factor=2"], "train.min_lr_factor=2 is invalid: expected a number in [0, 1]"),
    (["train.grad_clip=-1"], "train.grad_clip=-1 is invalid: expected a number >= 0 or null"),
    (["train.nonfinite=ignore"], "train.nonfinite=ignore is invalid: expected one of skip, stop"),
    (["train.progress=yes"], "train.progress=yes is invalid: expected true or false"),
    (["~train.lr"], "train.lr is missing from the config"),
    (["data.train.k=0"], "data.train.k must be an integer >= 1, got 0"),
    (["data.test.k=[0]"], "data.test.k must be an integer >= 1 or a list of them"),
    (["data.validation.num_lists=0"], "data.validation.num_lists must be an integer >= 1, got 0"),
    (["data.train.num_lists=8"], "data.train.num_lists=8 is invalid: expected at least train"),
    (["extractor.hidden=0"], "extractor.hidden must be >= 1, got 0"),
    (["extractor.hidden=abc"], "extractor.hidden=abc is invalid: Value 'abc' of type 'str'"),
    (["+extractor.width=3"], "extractor.width is not a key of the extractor config"),
    (["extractor.num_classes=5"], "extractor.num_classes=5 is invalid: black box sum takes"),
    (["estimator.input_size=5"], "estimator.input_size=5 is invalid: black box sum takes"),
    (["estimator.readout=last"], "estimator.readout must be one of cell, hidden, got 'last'"),
    (["estimator.training=semi"], "estimator.training=semi is invalid: expected one of offline,"),
    (["estimator.lr=-1"], "estimator.lr=-1 is invalid: expected a number in (0, "),
    (["estimator.online_targets=mode"], "estimator.online_targets=mode is invalid: expected one"),
    (["estimator.online_mc_samples=0"], "estimator.online_mc_samples=0 is invalid"),
    (["estimator.checkpoint=missing.pt"], "estimator.checkpoint=missing.pt is invalid: file"),
    (["pretrain.steps=0"], "pretrain.steps must be >= 1, got 0"),
    (["pretrain.soft_targets=mode"], "pretrain.soft_targets must be one of monte_carlo, argmax"),
    (["model.loss=l2"], "model.loss=l2 is invalid: expected one of mse, l1"),
    (["model=nalu", "model.loss=huber"], "model.loss=huber is invalid: expected one of mse, l1"),
    (["model.marginal_weight=-1"], "model.marginal_weight=-1 is invalid: expected a number >= 0"),
    (["model.entropy_start_epoch=-1"], "model.entropy_start_epoch=-1 is invalid"),
    (["model.name=foo"], "model.name=foo is invalid: expected one of estinet, nalu"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    INVALID_TRAIN_VALUES,
    ids=[" ".join(overrides) for overrides, _ in INVALID_TRAIN_VALUES],
)
def test_invalid_train_value(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate_train_config(compose_config("train", overrides))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


# (overrides, text the one-line message must contain). Hydra accepts each of these keys because
# of the leading +, so the config check is what keeps a run from ignoring them.
UNKNOWN_TRAIN_KEYS = [
    (["+train.batchsize=16"],
     "train.batchsize is not a key of the train config. Did you mean train.batch_size? "
     "Use train.batch_size=16 instead of +train.batchsize=16"),
    (["+trian.epochs=3"], "trian.epochs is not a key of the config. Did you mean train.epochs?"),
    (["+batch_size=8"], "Did you mean train.batch_size? Use train.batch_size=8"),
    (["+data.train.numlists=8"], "Did you mean data.train.num_lists?"),
    (["+data.trian.k=3"], "Did you mean data.train.k?"),
    (["+estimator.traning=online"], "Did you mean estimator.training?"),
    (["+foo=1"],
     "foo is not a key of the config, and no known key is close to it. Remove the +foo override"),
    (["model=nalu", "+model.samples=8"],
     "model.samples is not a key of the model config. Only model=reinforce defines it"),
    (["model=estinet", "+model.lr=1e-3"], "Only model=nalu defines it"),
    (["model=oracle", "+model.entropy_weight=1"], "Only model=estinet and model=reinforce"),
    (["experiment=paper", "+train.epoch=2"], "Did you mean train.epochs?"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    UNKNOWN_TRAIN_KEYS,
    ids=[" ".join(overrides) for overrides, _ in UNKNOWN_TRAIN_KEYS],
)
def test_unknown_train_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate_train_config(compose_config("train", overrides))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [["model=reinforce", "model.samples=8"], ["model=nalu", "model.lr=3e-3"], ["+hydra.foo=1"]],
    ids=["reinforce-samples", "nalu-lr", "hydra-key"],
)
def test_defined_keys_accepted(overrides):
    validate_train_config(compose_config("train", overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_device():
    with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
        validate_train_config(compose_config("train", ["device=cuda:1"]))


INVALID_PRETRAIN_VALUES = [
    (["seed=-1"], "seed=-1 is invalid"),
    (["device=tpu"], "device=tpu is invalid: expected auto, cpu, cuda or cuda:N"),
    (["black_box=max"], "black_box=max is invalid: expected one of sum"),
    (["estimator.lstm_hidden=0"], "estimator.lstm_hidden must be >= 1, got 0"),
    (["pretrain.batch_size=0"], "pretrain.batch_size must be >= 1, got 0"),
    (["pretrain.lr=abc"], "pretrain.lr=abc is invalid"),
    (["progress=yes"], "progress=yes is invalid: expected true or false"),
    (["+pretrain.stepz=3"], "Did you mean pretrain.steps? Use pretrain.steps=3"),
    (["+estimator.online_target=argmax"], "Did you mean estimator.online_targets?"),
    (["+progres=false"], "progres is not a key of the config. Did you mean progress?"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    INVALID_PRETRAIN_VALUES,
    ids=[" ".join(overrides) for overrides, _ in INVALID_PRETRAIN_VALUES],
)
def test_invalid_pretrain_value(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate_pretrain_config(compose_config("pretrain", overrides))
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override",
    ["train.batch_size=0", "estimator.training=semi", "data.train.k=0", "train.lr=0",
     "+train.batchsize=16"],
)
def test_invalid_value_stops_before_work(tmp_path, synthetic_mnist_root, monkeypatch, override):
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded although the config is invalid")

    monkeypatch.setattr(train, "build_addition_data", fail)
    cfg = compose_config("train", [f"data.root={synthetic_mnist_root}", override])

    with pytest.raises(ConfigError):
        run_training(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_relative_checkpoint_path_from_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config("train", ["estimator.checkpoint=models/estimator.pt"])
    with pytest.raises(ConfigError) as error:
        validate_train_config(cfg)
    assert str(tmp_path / "models" / "estimator.pt") in str(error.value)


def test_config_differences_lists_keys():
    saved = {"seed": 0, "train": {"epochs": 3, "lr": 0.1, "progress": True}, "data": {"k": [3]}}
    current = {"seed": 0, "train": {"epochs": 4, "lr": 0.1, "progress": False}, "extra": 1}
    differences = config_differences(saved, current, ignored=("train.progress",))
    assert differences == [
        "data.k: [3] -> <absent>",
        "extra: <absent> -> 1",
        "train.epochs: 3 -> 4",
    ]


def test_determinism_untouched_on_cpu(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_determinism(True, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_determinism_settings_for_cuda(monkeypatch):
    # Only flags and the environment change, so this runs without a GPU.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        configure_determinism(True, torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


def test_determinism_off_for_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_determinism(False, torch.device("cuda"))
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_user_cublas_setting_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        configure_determinism(True, torch.device("cuda"))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train.epoch=3"], "train.epoch is not a key of the train config. Did you mean "
                            "train.epochs? Use train.epochs=3"),
        (["trian.epochs=3"], "trian.epochs is not a key of the config. Did you mean train.epochs?"),
        (["data.train.num_list=5"], "Did you mean data.train.num_lists? Use data.train.num_lists=5"),
        (["foo=1"], "foo is not a key of the config, and no known key is close to it (keys of"),
    ],
)
def test_unknown_override_named(argv, expected):
    message = unknown_override_message(argv, "train")
    assert message is not None
    assert expected in message


@pytest.mark.parametrize(
    "argv",
    [
        ["seed=1", "model=nalu", "train.epochs=2", "experiment=quick"],
        ["model.samples=8"],  # model=reinforce defines it; the config validation checks the model
        ["+train.batchsize=16"],  # an added key is the config validation's to reject
        ["hydra.run.dir=out", "hydra/launcher=parallel", "--multirun", "seed=0,1,2"],
        ["data.test={num_lists: 10, k: [10]}", "estimator.forget_bias=3"],
    ],
)
def test_known_overrides_pass(argv):
    assert unknown_override_message(argv, "train") is None
