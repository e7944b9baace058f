"""Policy files are read only by plain name from the files directory, as regular files under a
size limit, and checked against the model; errors are one line and say nothing of other paths."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import save

from attention_backend.policy_files import (
    ModelShape,
    PolicyError,
    calib_tensors,
    read_file,
    read_policy_files,
    static_heads_mask,
)
from attention_backend.settings import QadaSettings

SHAPE = ModelShape(
    num_layers=2, num_heads=3, num_kv_heads=1, head_size=4, max_model_len=1024, block_size=128, page_chunk=16
)


@pytest.fixture
def files_dir(tmp_path):
    (tmp_path / "heads.json").write_text(json.dumps({"long_heads": [[1, 2]]}))
    return tmp_path


def test_a_plain_name_in_the_directory_is_read(files_dir):
    settings = QadaSettings(policy="static", static_heads="heads.json")
    files = read_policy_files(settings, str(files_dir))
    assert static_heads_mask(files["static_heads"], SHAPE).tolist() == [[False] * 3, [False, False, True]]


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../heads.json", "sub/heads.json", "..", "", "a\0b", "/dev/zero"]
)
def test_paths_are_refused_whatever_they_name(files_dir, name):
    with pytest.raises(PolicyError, match="not a file name") as err:
        read_file(str(files_dir), name)
    assert "passwd" not in str(err.value) or name == "/etc/passwd"  # only the name it was given


def test_fifos_links_and_directories_are_not_regular_files(files_dir):
    os.mkfifo(files_dir / "fifo")
    (files_dir / "link").symlink_to("/etc/hostname")
    (files_dir / "dir").mkdir()
    for name in ("fifo", "link", "dir", "missing"):
        errors = []

        def read(name=name, errors=errors):
            try:
                read_file(str(files_dir), name)
            except PolicyError as exc:
                errors.append(str(exc))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(5)  # a FIFO must not block the reader
        assert errors == [f"no regular file named {name!r} in attention.files_dir"], name


def test_size_limit_and_no_directory(files_dir):
    (files_dir / "big").write_bytes(b"x" * 100)
    with pytest.raises(PolicyError, match="larger than 64 bytes"):
        read_file(str(files_dir), "big", max_bytes=64)
    with pytest.raises(PolicyError, match="policy files are off"):
        read_file(None, "heads.json")


@pytest.mark.parametrize("heads", [[[2, 0]], [[0, 3]], [[-1, 0]], [[0]], [["0", 1]], "x", [[True, 0]]])
def test_static_heads_must_be_heads_of_the_model(heads):
    with pytest.raises(PolicyError, match="static_heads"):
        static_heads_mask(heads, SHAPE)


def test_calib_must_match_the_model():
    mu, sigma = torch.zeros(2, 1, 4), torch.eye(4).expand(2, 1, 4, 4).contiguous()
    got = calib_tensors(save({"mu": mu, "sigma": sigma}), SHAPE)
    assert torch.equal(got[0], mu) and torch.equal(got[1], sigma)
    for bad, needle in (
        ({"mu": mu}, "sigma"),
        ({"mu": torch.zeros(2, 3, 4), "sigma": sigma}, "mu of shape"),
        ({"mu": mu * float("nan"), "sigma": sigma}, "non-finite"),
    ):
        with pytest.raises(PolicyError, match=needle):
            calib_tensors(save(bad), SHAPE)
    with pytest.raises(PolicyError, match="not a safetensors"):
        calib_tensors(b"\xff" * 64, SHAPE)


def test_bounds_come_from_the_model():
    SHAPE.check(QadaSettings(t_sink=16, t_local=1000))
    for settings, needle in (
        (QadaSettings(t_sink=24, t_local=1000), "max_model_len"),
        (QadaSettings(decode_tail=2000), "decode_tail"),
        (QadaSettings(page_chunk=48), "divide"),
    ):
        with pytest.raises(PolicyError, match=needle):
            SHAPE.check(settings)
    with pytest.raises(ValueError):  # absolute bounds: before any model is asked
        QadaSettings(t_sink=10**15)


def test_file_errors_are_not_hidden_behind_format_errors(files_dir):
    settings = QadaSettings(policy="static", static_heads="/etc/passwd")
    with pytest.raises(PolicyError, match="not a file name"):
        read_policy_files(settings, str(files_dir))
    (files_dir / "bad.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="not a JSON object with long_heads"):
        read_policy_files(settings.replace(static_heads="bad.json"), str(files_dir))
