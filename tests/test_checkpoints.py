import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from usam_backend.core.errors import CheckpointError
from usam_backend.sam.checkpoints import CHECKPOINTS, download_checkpoint, find_checkpoint, resolve_checkpoint
from usam_backend.sam.models import build_tiny_sam, load_sam

PAYLOAD = b"pretend checkpoint bytes " * 5000


@pytest.fixture
def file_server() -> Iterator[str]:
    """A loopback HTTP server standing in for the checkpoint host."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/sam.pth":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_download_verifies_md5(file_server, tmp_path):
    target = tmp_path / "ckpt" / "sam.pth"
    download_checkpoint(f"{file_server}/sam.pth", target, hashlib.md5(PAYLOAD).hexdigest())
    assert target.read_bytes() == PAYLOAD
    assert list(target.parent.iterdir()) == [target]  # no temporary files left


def test_corrupt_download_leaves_nothing(file_server, tmp_path):
    target = tmp_path / "sam.pth"
    with pytest.raises(CheckpointError, match="MD5"):
        download_checkpoint(f"{file_server}/sam.pth", target, "0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["/missing.pth", None])
def test_unreachable_host_names_url_and_destination(file_server, tmp_path, path):
    url = f"{file_server}{path}" if path else "http://127.0.0.1:9/sam.pth"  # port 9: nothing listens
    target = tmp_path / "sam.pth"
    with pytest.raises(CheckpointError) as info:
        download_checkpoint(url, target, "0" * 32)
    message = str(info.value)
    assert url in message and str(target) in message and "USAM_SAM_CHECKPOINT" in message
    assert list(tmp_path.iterdir()) == []


def test_official_table():
    assert set(CHECKPOINTS) == {"vit_h", "vit_l", "vit_b", "vit_t"}
    assert all(len(c.md5) == 32 and c.url.startswith("https://") for c in CHECKPOINTS.values())


def test_explicit_and_cached_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        find_checkpoint("vit_b", tmp_path / "nope.pth", tmp_path)
    assert find_checkpoint("vit_b", None, tmp_path) is None
    cached = tmp_path / "checkpoints" / CHECKPOINTS["vit_b"].filename
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    assert resolve_checkpoint("vit_b", None, tmp_path) == cached


def test_load_sam_reads_a_checkpoint_with_map_location(tmp_path):
    model = build_tiny_sam(seed=5)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a vit_b checkpoint"):
        load_sam("vit_b", path, tmp_path, "cpu")


def test_load_sam_refuses_unreadable_checkpoint(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not read"):
        load_sam("vit_t", path, tmp_path, "cpu")


def test_benchmarks_may_use_random_weights_without_downloading(tmp_path):
    sam = load_sam("vit_t", None, tmp_path, "cpu", allow_random=True)
    assert sam.random_weights and sam.embedding_dim == 1024
    assert not (tmp_path / "checkpoints").exists()


def test_tiny_is_seeded_and_says_so(tmp_path):
    first, second = load_sam("tiny", None, tmp_path, "cpu"), load_sam("tiny", None, tmp_path, "cpu")
    assert first.random_weights and "random" in first.weights and first.fingerprint == "tiny-random"
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert Path(first.weights).name != "" and first.embedding_dim == 256
