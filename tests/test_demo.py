"""The demo reuses finished stages only when the same teacher made them."""

import hashlib

from src.demo import stale_artifacts


def test_artifacts_of_another_teacher_are_stale(tmp_path):
    teacher, artifacts = tmp_path / "teacher.safetensors", tmp_path / "artifacts"
    teacher.write_bytes(b"weights v1")
    assert not stale_artifacts(artifacts, teacher)  # nothing made yet
    (artifacts / "ode_pairs").mkdir(parents=True)
    assert stale_artifacts(artifacts, teacher)  # made by an unknown teacher
    (artifacts / "teacher.sha256").write_text(hashlib.sha256(b"weights v1").hexdigest())
    assert not stale_artifacts(artifacts, teacher)
    teacher.write_bytes(b"weights v2")
    assert stale_artifacts(artifacts, teacher)
