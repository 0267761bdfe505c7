"""Tests for ``cirlab.data.download`` against a local HTTP server (127.0.0.1 only, no internet)."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cirlab.cli import data as data_cli
from cirlab.data import download as dl

N_IMAGES = 4


def _png(seed: int) -> bytes:
    img = Image.new("RGB", (24, 16), (seed * 40 % 256, 90, 200 - seed * 30))
    img.putpixel((seed, seed), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


IMAGES = {f"{i:04d}.png": _png(i) for i in range(1, N_IMAGES + 1)}
ARCHIVE = _zip(
    {
        "Toy_HR/readme.txt": b"not an image",
        **{f"Toy_HR/{name}": data for name, data in IMAGES.items()},
        "Toy_HR/nested/9999.png": _png(9),  # deeper than member_dir: ignored
        "Other/0005.png": _png(5),  # outside member_dir: ignored
    }
)
ARCHIVE_SHA256 = hashlib.sha256(ARCHIVE).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        data = srv.files.get(self.path)
        if data is None:
            srv.log.append((self.path, rng, 404))
            self.send_error(404)
            return
        start = 0
        status = 200
        if rng and srv.honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            assert m, f"unexpected Range header {rng!r}"
            start = int(m.group(1))
            if start >= len(data):
                srv.log.append((self.path, rng, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        srv.log.append((self.path, rng, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
        self.end_headers()
        if srv.drop_after is not None:  # simulate a dropped connection, once
            cut, srv.drop_after = srv.drop_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files = {"/Toy_HR.zip": ARCHIVE}
    srv.log = []
    srv.honour_range = True
    srv.drop_after = None
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def spec(server) -> dl.DatasetSpec:
    return dl.DatasetSpec(
        name="toy",
        urls=(f"{server.url}/Toy_HR.zip",),
        filename="Toy_HR.zip",
        target="Toy/Toy_HR",
        member_dir="Toy_HR",
        num_images=N_IMAGES,
        size=len(ARCHIVE),
        checksum=ARCHIVE_SHA256,
        description="toy set",
    )


def _run(spec, root, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("retries", 2)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("log", lambda msg: None)
    return dl.download_dataset(spec, root, **kw)


def _assert_extracted(target: Path) -> None:
    assert sorted(p.name for p in target.iterdir()) == sorted(IMAGES)
    for name, data in IMAGES.items():
        assert (target / name).read_bytes() == data
    # no leftovers: temp folders, part files, archive (deleted by default)
    assert not list(target.parent.glob(".*partial*"))
    downloads = target.parents[1] / "downloads"
    assert not list(downloads.glob("*")) if downloads.exists() else True


def test_full_download_checksum_and_extraction(server, spec, tmp_path):
    target = _run(spec, tmp_path)
    assert target == tmp_path / "Toy" / "Toy_HR"
    _assert_extracted(target)
    assert server.log == [("/Toy_HR.zip", None, 200)]


def test_keep_archive(server, spec, tmp_path):
    _run(spec, tmp_path, keep_archive=True)
    assert (tmp_path / "downloads" / "Toy_HR.zip").read_bytes() == ARCHIVE


def test_resume_from_truncated_part(server, spec, tmp_path):
    half = len(ARCHIVE) // 2
    part = tmp_path / "downloads" / "Toy_HR.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ARCHIVE[:half])
    _run(spec, tmp_path)
    assert server.log == [("/Toy_HR.zip", f"bytes={half}-", 206)]
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")
    assert not part.exists()


def test_server_ignoring_range_restarts(server, spec, tmp_path):
    server.honour_range = False
    half = len(ARCHIVE) // 2
    part = tmp_path / "downloads" / "Toy_HR.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ARCHIVE[:half])
    _run(spec, tmp_path)
    # the client asked for a range, got 200 with the whole file, and did not append it
    assert server.log == [("/Toy_HR.zip", f"bytes={half}-", 200)]
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_dropped_connection_is_retried_and_resumed(server, spec, tmp_path):
    server.drop_after = 1000
    _run(spec, tmp_path)
    assert server.log == [
        ("/Toy_HR.zip", None, 200),
        ("/Toy_HR.zip", "bytes=1000-", 206),
    ]
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_complete_part_file_is_not_fetched_again(server, spec, tmp_path):
    part = tmp_path / "downloads" / "Toy_HR.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ARCHIVE)
    _run(spec, tmp_path)
    assert server.log == []
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_complete_part_without_pinned_size_gets_416(server, spec, tmp_path):
    spec = replace(spec, size=None)
    part = tmp_path / "downloads" / "Toy_HR.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ARCHIVE)
    _run(spec, tmp_path)
    assert server.log == [("/Toy_HR.zip", f"bytes={len(ARCHIVE)}-", 416)]
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_checksum_mismatch_raises_and_renames(server, spec, tmp_path):
    wrong = "0" * 64
    spec = replace(spec, checksum=wrong)
    with pytest.raises(dl.ChecksumError) as info:
        _run(spec, tmp_path)
    msg = str(info.value)
    assert "Toy_HR.zip" in msg and wrong in msg and ARCHIVE_SHA256 in msg
    downloads = tmp_path / "downloads"
    assert (downloads / "Toy_HR.zip.bad").read_bytes() == ARCHIVE
    assert not (downloads / "Toy_HR.zip").exists()
    assert not (downloads / "Toy_HR.zip.part").exists()
    assert not (tmp_path / "Toy" / "Toy_HR").exists()


def test_size_mismatch_raises(server, spec, tmp_path):
    server.files["/Toy_HR.zip"] = ARCHIVE + b"junk"
    with pytest.raises(dl.ChecksumError, match="size mismatch for Toy_HR.zip"):
        _run(spec, tmp_path)
    assert (tmp_path / "downloads" / "Toy_HR.zip.bad").exists()


def test_no_verify_skips_checksum(server, spec, tmp_path):
    spec = replace(spec, checksum="0" * 64)
    _run(spec, tmp_path, verify=False)
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_md5_checksum(server, spec, tmp_path):
    spec = replace(spec, checksum=hashlib.md5(ARCHIVE).hexdigest(), checksum_algo="md5")
    _run(spec, tmp_path)
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def test_second_run_downloads_nothing(server, spec, tmp_path):
    _run(spec, tmp_path)
    n_requests = len(server.log)
    messages: list[str] = []
    target = _run(spec, tmp_path, log=messages.append)
    assert len(server.log) == n_requests
    assert any("already has 4 images, skipping" in m for m in messages)
    _assert_extracted(target)


def test_incomplete_existing_folder_is_not_overwritten(server, spec, tmp_path):
    target = tmp_path / "Toy" / "Toy_HR"
    target.mkdir(parents=True)
    (target / "0001.png").write_bytes(IMAGES["0001.png"])
    with pytest.raises(dl.DownloadError, match="holds 1 images instead of 4"):
        _run(spec, tmp_path)
    assert server.log == []


def test_wrong_image_count_leaves_no_target(server, spec, tmp_path):
    spec = replace(spec, num_images=5)
    with pytest.raises(dl.DownloadError, match="found 4 images"):
        _run(spec, tmp_path)
    assert not (tmp_path / "Toy" / "Toy_HR").exists()
    assert not list((tmp_path / "Toy").glob(".*"))


def test_expected_names_are_checked(server, spec, tmp_path):
    names = frozenset(f"{i:04d}.png" for i in range(2, N_IMAGES + 2))
    with pytest.raises(dl.DownloadError, match="unexpected image names"):
        _run(replace(spec, expected_names=names), tmp_path)
    ok = frozenset(IMAGES)
    _run(replace(spec, expected_names=ok), tmp_path)


def test_path_traversal_is_rejected(server, spec, tmp_path):
    evil = _zip({"Toy_HR/0001.png": _png(1), "../Toy_HR/0002.png": _png(2)})
    server.files["/Toy_HR.zip"] = evil
    spec = replace(
        spec, size=len(evil), checksum=hashlib.sha256(evil).hexdigest(), num_images=1
    )
    root = tmp_path / "root"
    with pytest.raises(dl.DownloadError, match="unsafe archive member"):
        _run(spec, root)
    assert not (tmp_path / "Toy_HR").exists()
    assert not (root / "Toy" / "Toy_HR").exists()


def test_fallback_to_second_url_on_404(server, spec, tmp_path):
    spec = replace(spec, urls=(f"{server.url}/missing.zip", f"{server.url}/Toy_HR.zip"))
    _run(spec, tmp_path)
    assert [entry[2] for entry in server.log] == [404, 200]
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_gives_clear_error(spec, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/Toy_HR.zip"
    spec = replace(spec, urls=(url,))
    with pytest.raises(dl.DownloadError) as info:
        _run(spec, tmp_path, retries=1)
    msg = str(info.value)
    assert url in msg
    assert "by hand" in msg and str(tmp_path / "Toy" / "Toy_HR") in msg
    assert "(after 2 attempts)" in msg
    assert not (tmp_path / "Toy" / "Toy_HR").exists()


def test_cli_downloads_with_overridden_manifest(
    server, spec, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(dl, "MANIFEST", {"toy": spec})
    rc = data_cli.main(
        ["--root", str(tmp_path), "--only", "toy", "--no-progress", "--retries", "0"]
    )
    assert rc == 0
    _assert_extracted(tmp_path / "Toy" / "Toy_HR")
    assert data_cli.main(["--root", str(tmp_path), "--only", "toy"]) == 0
    assert "skipping" in capsys.readouterr().out
    assert len(server.log) == 1


def test_cli_error_exit_code(spec, tmp_path, monkeypatch, capsys):
    bad = replace(spec, urls=(f"http://127.0.0.1:{_closed_port()}/x.zip",))
    monkeypatch.setattr(dl, "MANIFEST", {"toy": bad})
    assert data_cli.main(["--root", str(tmp_path), "--only", "toy", "--retries", "0"]) == 1
    assert "cirlab-data: error:" in capsys.readouterr().err


def test_cli_list_and_bad_name(tmp_path, capsys):
    assert data_cli.main(["--list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("div2k_train", "div2k_valid", "cbsd68"):
        assert name in out
    assert "checksum not pinned" in out  # cbsd68
    with pytest.raises(SystemExit) as info:
        data_cli.main(["--root", str(tmp_path), "--only", "nope"])
    assert info.value.code == 2


def test_manifest_is_consistent():
    m = dl.MANIFEST
    assert set(m) == {"div2k_train", "div2k_valid", "cbsd68"}
    assert (
        m["div2k_train"].target == "DIV2K/DIV2K_train_HR"
        and m["div2k_train"].num_images == 800
    )
    assert (
        m["div2k_valid"].target == "DIV2K/DIV2K_valid_HR"
        and m["div2k_valid"].num_images == 100
    )
    assert m["cbsd68"].target == "CBSD68" and len(m["cbsd68"].expected_names) == 68
    for spec in m.values():
        if spec.checksum is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", spec.checksum)
        assert all(u.startswith(("https://", "http://")) for u in spec.urls)


def test_cbsd68_names_match_shared_copy():
    """The pinned CBSD68 names agree with the project's shared copy, where present."""
    from conftest import shared_data_path

    folder = shared_data_path("test", "CBSD68")
    assert {p.name for p in folder.glob("*.png")} == dl.MANIFEST[
        "cbsd68"
    ].expected_names


def test_cbsd68_spec_extracts_from_repository_archive(server, tmp_path):
    """The real cbsd68 spec (URLs swapped for the local server) on an FFDNet-shaped archive."""
    from conftest import shared_data_path

    folder = shared_data_path("test", "CBSD68")
    members = {
        f"FFDNet-master/testsets/CBSD68/{p.name}": p.read_bytes()
        for p in folder.glob("*.png")
    }
    members["FFDNet-master/testsets/Kodak24/kodim01.png"] = _png(1)
    members["FFDNet-master/README.md"] = b"readme"
    server.files["/master.zip"] = _zip(members)
    spec = replace(dl.MANIFEST["cbsd68"], urls=(f"{server.url}/master.zip",))
    target = _run(spec, tmp_path)
    assert target == tmp_path / "CBSD68"
    assert {p.name for p in target.iterdir()} == spec.expected_names
    assert (target / "3096.png").read_bytes() == (folder / "3096.png").read_bytes()
