"""Firmware profiles: every built-in one validates; bad files name the file, key and rule."""

from __future__ import annotations

import pytest

from fedge.edge_agent.profile import ProfileError, available_profiles, load_profile
from fedge.models.spec import ModelSpec


def test_builtin_profiles_are_valid():
    names = available_profiles()
    assert {"rpi4", "rpi5", "jetson-nano", "jetson-orin", "desktop-gpu", "sim"} <= set(names)
    for name in names:
        prof = load_profile(name)
        assert prof.name == name and prof.batch_size > 0 and prof.memory_budget_mb > 0


def test_user_profile_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel: conv4\nbatch_size: 8\nprecision: fp16\n")
    prof = load_profile(str(path))
    assert (prof.model, prof.batch_size, prof.precision, prof.device) == (ModelSpec("conv4"), 8, "fp16", "cpu")
    # a model's options: a mapping beside its name, typed as YAML reads it; defaults are dropped
    path.write_text("name: mine\nmodel: conv4-mpt\nmodel_options: {prune_ratio: 0.9, seed: 0}\n")
    prof = load_profile(str(path))
    assert prof.model == ModelSpec("conv4-mpt", {"prune_ratio": 0.9})
    assert prof.summary()["model"] == "conv4-mpt" and prof.summary()["model_options"] == {"prune_ratio": 0.9}


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nbatch: 3\n", r"unknown key 'batch'; allowed keys: .*batch_size"),
        ("name: x\nthreads: four\n", r"key 'threads' must be positive integer, got 'four'"),
        ("name: x\ndevice: tpu\n", r"key 'device' is 'tpu'; allowed: cpu, cuda"),
        ("name: x\nmodel: resnet1000\n", r"key 'model' is 'resnet1000'; allowed: .*mlp"),
        ("name: x\nmodel: conv4-mpt@0.9\n", r"key 'model' is 'conv4-mpt@0.9'; allowed: .*mlp"),  # shorthand: CLI only
        ("name: x\nmodel: conv4-mpt\nmodel_options: {prune_ratio: 1.5}\n",
         r"key 'model_options': model conv4-mpt: option prune_ratio=1.5 is not a number in \[0, 1\)"),
        ("name: x\nmodel: conv4-mpt\nmodel_options: {prune_ratio: '0.9'}\n", r"option prune_ratio='0.9' is not a number"),
        ("name: x\nmodel: conv4\nmodel_options: {width: 2}\n",
         r"key 'model_options': model conv4 has no option 'width'; it takes no options"),
        ("name: x\nmodel_options: [1]\n", r"key 'model_options' must be a mapping"),
        ("name: x\nbatch_size: 0\n", r"key 'batch_size' must be positive"),
        ("name: x\nlocal_epochs: true\n", r"key 'local_epochs' must be"),
        ("name: x\nmax_epochs: 0\n", r"key 'max_epochs' must be positive"),
        ("name: x\nlocal_epochs: 5\nmax_epochs: 3\n", r"key 'local_epochs' \(5\) is above max_epochs \(3\)"),
        ("name: x\nmax_train_seconds: -1\n", r"key 'max_train_seconds' must be positive"),
        ("name: x\nlr: .nan\n", r"key 'lr' must be a finite number"),
        ("model: mlp\n", r"missing required key 'name'"),
        ("- just\n- a list\n", r"must be a YAML mapping"),
        ("name: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_profiles_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=match) as err:
        load_profile(str(path))
    assert str(path) in str(err.value)


def test_missing_profile_lists_the_builtin_ones(tmp_path):
    with pytest.raises(ProfileError, match="no profile named 'rpi9'; built-in profiles: .*rpi4"):
        load_profile("rpi9")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(str(tmp_path / "absent.yaml"))


def test_task_limits_come_from_the_profile():
    """The round settings a device accepts are bounded by its profile (edge_agent/task_checks.py);
    tests/test_limits.py sends each bad round over a real broker, this checks the rules alone."""
    import dataclasses

    from fedge.edge_agent.task_checks import Refused, check_train_settings

    prof = dataclasses.replace(load_profile("rpi4"), max_epochs=3, max_train_seconds=60)
    check_train_settings({"epochs": 3, "batch_size": 999, "lr": 0.1, "momentum": 0.5}, prof, 1000)  # batch is capped
    for train, match in (({"epochs": 4}, "'epochs' is 4; this device allows 1..3"),
                         ({"epochs": 2.0}, "'epochs' must be an integer"),
                         ({"momentum": 1.0}, "'momentum' is 1.0"), ({"weight_decay": -1}, "'weight_decay'"),
                         ({"optimizer": "lbfgs"}, "'optimizer' is 'lbfgs'"), ({"lr": float("inf")}, "finite")):
        with pytest.raises(Refused, match=match):
            check_train_settings(train, prof, 1000)
    # measured 0.02 s per sample and epoch: 3 epochs x 1000 samples = 60 s fits, 2000 samples do not
    check_train_settings({"epochs": 3}, prof, 1000, seconds_per_sample=0.02)
    with pytest.raises(Refused, match=r"about 120 s at this device's measured speed, above max_train_seconds=60"):
        check_train_settings({"epochs": 3}, prof, 2000, seconds_per_sample=0.02)
