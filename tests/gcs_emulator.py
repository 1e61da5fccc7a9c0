"""A local Cloud Storage emulator for tests: gcp-storage-emulator (JSON API, in memory) on a loopback port, with
the request features of the real service that the project relies on and the emulator lacks:

- `ifGenerationMatch` on uploads and deletes (0: the object must not exist; g: its generation must be g),
  answered with 412 like the service: the run lock's create-if-absent and its stale-lock takeover rely on it;
- suffix ranges (`Range: bytes=-N`, the last N bytes), which ArrayRecord's reader uses to find a file's index;
- the atomic object move within a bucket (`.../o/SRC/moveTo/o/DST`), which gcsfs uses to rename;
- an object's generation in the headers of its download (`x-goog-generation`), which TensorStore reads back
  when it saves a checkpoint with many arrays, and `ifGenerationNotMatch` (304 when unchanged).

`python tests/gcs_emulator.py PORT BUCKET...` serves until killed; the `gcs` fixture (tests/conftest.py)
starts it as a subprocess and hands tests the environment a user would set: STORAGE_EMULATOR_HOST only.
Request counts by kind are served at /_counts (GET) so that tests can check that no object was downloaded.
"""

import collections
import http
import logging
import re
import subprocess
import sys
import time
import urllib.request

COUNTS_PATH = "/_counts"


def _patch_emulator(counts: collections.Counter):
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def generation_of(storage, bucket, name):
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return "0"

    def precondition_failed(request, response, storage, name) -> bool:
        wanted = request.query.get("ifGenerationMatch")
        if wanted and generation_of(storage, request.params["bucket_name"], name) != wanted[0]:
            response.status = http.HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            return True
        return False

    original_insert, original_delete, original_download = objects.insert, objects.delete, objects.download

    def insert(request, response, storage, *args, **kwargs):
        counts["upload"] += 1
        if "upload_id" not in request.query:  # the first request of an upload names the object
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or request.data).get("name")
            if name is not None and precondition_failed(request, response, storage, name):
                return None
        return original_insert(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        counts["delete"] += 1
        if precondition_failed(request, response, storage, request.params["object_id"]):
            return None
        return original_delete(request, response, storage, *args, **kwargs)

    def download(request, response, storage, *args, **kwargs):
        counts["download"] += 1
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
        if suffix:
            try:
                size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
            except NotFound:
                response.status = http.HTTPStatus.NOT_FOUND
                return None
            request._request_handler.headers.replace_header(
                "range", f"bytes={max(0, size - int(suffix.group(1)))}-")
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
            not_match = request.query.get("ifGenerationNotMatch")
            if not_match and not_match[0] == str(obj["generation"]):
                response.status = http.HTTPStatus.NOT_MODIFIED
                return None
        return original_download(request, response, storage, *args, **kwargs)

    def move(request, response, storage, *args, **kwargs):
        counts["move"] += 1
        bucket, source = request.params["bucket_name"], request.params["object_id"]
        try:
            moved = objects._copy(request.base_url, storage, bucket, source, bucket, request.params["dest_object_id"])
            storage.delete_file(bucket, source)
        except NotFound:
            response.status = http.HTTPStatus.NOT_FOUND
            return None
        response.json(moved)

    def counted(kind, handler):
        def wrapped(request, response, storage, *args, **kwargs):
            counts[kind] += 1
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    def report(request, response, storage, *args, **kwargs):
        response.json(dict(counts))

    replaced = {original_insert: insert, original_delete: delete, original_download: download,
                objects.copy: counted("copy", objects.copy), objects.rewrite: counted("copy", objects.rewrite),
                objects.compose: counted("compose", objects.compose)}
    handlers = []
    for regex, methods in server.HANDLERS:
        handlers.append((regex, {method: replaced.get(handler, handler) for method, handler in methods.items()}))
    move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                  r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
    server.HANDLERS = (("^" + re.escape(COUNTS_PATH) + "$", {"GET": report}), move_route, *handlers)
    # The router's fallback for uploads posted without the /upload prefix, and `get` with alt=media, call
    # these through the module.
    objects.insert, objects.download = insert, download


def serve(port: int, buckets: list[str]):
    logging.basicConfig(level=logging.CRITICAL)
    counts = collections.Counter()
    _patch_emulator(counts)
    from gcp_storage_emulator.handlers import buckets as bucket_handlers
    from gcp_storage_emulator.server import create_server
    from http.server import BaseHTTPRequestHandler
    BaseHTTPRequestHandler.log_message = lambda *args: None
    emulator = create_server("127.0.0.1", port, in_memory=True)
    for bucket in buckets:
        bucket_handlers.create_bucket(bucket, emulator._storage)
    emulator.run()


class Emulator:
    """The emulator in a subprocess; `env` is what a user sets to point the project at it."""

    def __init__(self, port: int, buckets: list[str]):
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url}
        self.process = subprocess.Popen([sys.executable, __file__, str(port), *buckets],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the storage emulator did not start on {self.url}") from None
                time.sleep(0.1)

    def counts(self) -> dict:
        import json
        return json.loads(urllib.request.urlopen(self.url + COUNTS_PATH, timeout=10).read())

    def stop(self):
        self.process.kill()
        self.process.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
