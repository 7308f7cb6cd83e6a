"""Firmware profiles: every built-in one validates; bad files name the file, key and rule."""

from __future__ import annotations

import pytest

from fedge.edge_agent.profile import ProfileError, available_profiles, load_profile


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
    assert (prof.model, prof.batch_size, prof.precision, prof.device) == ("conv4", 8, "fp16", "cpu")


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nbatch: 3\n", r"unknown key 'batch'; allowed keys: .*batch_size"),
        ("name: x\nthreads: four\n", r"key 'threads' must be positive integer, got 'four'"),
        ("name: x\ndevice: tpu\n", r"key 'device' is 'tpu'; allowed: cpu, cuda"),
        ("name: x\nmodel: resnet1000\n", r"key 'model' is 'resnet1000'; allowed: .*mlp"),
        ("name: x\nbatch_size: 0\n", r"key 'batch_size' must be positive"),
        ("name: x\nlocal_epochs: true\n", r"key 'local_epochs' must be"),
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
