"""core/files.py on a local disk and in an (emulated) gs:// bucket: the same calls, each object-store difference
handled (no rename, no exclusive create, no append, no directory rename)."""

import os
import threading

import pytest

from smfsr_jax.core import errors, files


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket_dir")


def test_write_replaces_whole_files_and_leaves_nothing_else(root):
    target = files.join(root, "a", "config.json")
    files.write_text(target, "one")
    files.write_text(target, "two")
    assert files.read_text(target) == "two"
    assert files.listdir(files.join(root, "a")) == ["config.json"]  # no partial or temporary file left


def test_create_exclusive_admits_one_writer(root):
    lock = files.join(root, "run.lock")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(files.create_exclusive(lock, f"{i}".encode())))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]
    assert files.read_text(lock) in {"0", "1", "2", "3"}


def test_delete_if_unchanged_loses_to_a_replacement(root):
    lock = files.join(root, "run.lock")
    assert files.read_versioned(lock) is None
    files.write_text(lock, "old")
    content, version = files.read_versioned(lock)
    assert content == b"old"
    files.write_text(lock, "new")  # replaced since it was read: the conditional delete must refuse
    assert not files.delete_if_unchanged(lock, version)
    assert files.read_text(lock) == "new"
    _, version = files.read_versioned(lock)
    assert files.delete_if_unchanged(lock, version) and not files.exists(lock)
    assert not files.delete_if_unchanged(lock, version)  # gone


def test_append_adds_without_rewriting(root, request):
    log = files.join(root, "metrics.jsonl")
    counts = request.getfixturevalue("gcs").counts if root.startswith("gs://") else None
    before = counts() if counts else {}
    for i in range(4):
        files.append_bytes(log, f"{i}\n".encode())
    assert files.read_text(log) == "0\n1\n2\n3\n"
    assert files.listdir(root) == ["metrics.jsonl"]  # the composed parts are gone
    if counts:  # the object grows by composition: no download of what it holds
        assert counts().get("download", 0) == before.get("download", 0) + 1  # the read above
        assert counts()["compose"] - before.get("compose", 0) == 3


def test_move_renames_a_directory_without_downloading_it(root, request):
    step = files.join(root, "checkpoints", "4")
    files.write_bytes(files.join(step, "state", "d", "chunk"), os.urandom(4096))
    files.write_text(files.join(step, "commit_success.txt"), "ok")
    counts = request.getfixturevalue("gcs").counts if root.startswith("gs://") else None
    before = counts() if counts else {}
    files.move(step, files.join(root, "checkpoints", "4.corrupt-x"))
    assert files.listdir(files.join(root, "checkpoints")) == ["4.corrupt-x"]
    assert [f[len(root):] for f in files.walk_files(root)] == ["/checkpoints/4.corrupt-x/commit_success.txt",
                                                                "/checkpoints/4.corrupt-x/state/d/chunk"]
    if counts:
        assert counts().get("download", 0) == before.get("download", 0)
        assert counts().get("upload", 0) == before.get("upload", 0)


def test_copy_tree_writes_the_named_files_last_and_stage_makes_a_local_copy(root, tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "dataset_info.json").write_text("{}")
    (source / "sub" / "records").write_bytes(b"r" * 1000)
    destination = files.join(root, "copy")
    files.copy_tree(str(source), destination, last=["dataset_info.json"])
    assert files.walk_files(destination) == [files.join(destination, "dataset_info.json"),
                                             files.join(destination, "sub", "records")]
    local = files.stage(destination)
    assert not files.is_remote(local)
    assert open(os.path.join(local, "sub", "records"), "rb").read() == b"r" * 1000
    assert files.stage(destination) == local  # once per content


def test_check_writable(root, tmp_path):
    files.check_writable(files.join(root, "out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.UserError, match="exists and is not a directory"):
        files.check_writable(str(blocker))


def test_configure_storage_derives_every_endpoint_from_the_emulator_variable():
    environ = {"STORAGE_EMULATOR_HOST": "localhost:9023"}
    files.configure_storage(environ)
    assert environ["TENSORSTORE_GCS_HTTP_URL"] == environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == "http://localhost:9023"
    assert environ["EPATH_USE_TF"] == "false"
    environ = {}
    files.configure_storage(environ)
    assert environ == {"EPATH_USE_TF": "false"}  # no emulator: the real service, through epath's fsspec backend


def test_entries_list_one_level(root):
    for name in ("x.png", "sub/y.png", "sub/deeper/z.png"):
        files.write_text(files.join(root, "folder", name), "")
    assert files.entries(files.join(root, "folder")) == (["x.png"], ["sub"])
