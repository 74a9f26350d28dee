"""Snapshots for a fleet, on real S3 engines (SeaweedFS and Ceph RGW): push only what the
store lacks, restore anywhere — eagerly, lazily, into QEMU — every byte checked, and
gc that removes only what no snapshot names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


from qfram import snapshot
from qfram.lab.demo import fill_demo
from qfram.ram import RAMBlock, RAMList

PY = sys.executable
MiB = 1 << 20


def qfram(*args) -> list:
    return [PY, "-m", "qfram", *args]


def run(engine, *args, timeout: float = 180, check: bool = True):
    out = subprocess.run(qfram(*args), capture_output=True, text=True, timeout=timeout,
                         env=engine.env)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def make_snapshot(path, size: int = 24 * MiB, seed: int = 1, layout: str = "mapped",
                  change=None) -> RAMList:
    ram = RAMList([RAMBlock.anonymous("pc.ram", size, huge=False),
                   RAMBlock.anonymous("vga.vram", 2 * MiB, huge=False)])
    fill_demo(ram["pc.ram"].region, seed=seed)
    fill_demo(ram["vga.vram"].region, seed=seed + 100)
    ram["pc.ram"].region[size - 3 * MiB:] = bytes(3 * MiB)     # memory never touched
    if change:
        change(ram)
    snapshot.save(ram, str(path), layout=layout)
    return ram


def test_push_stores_only_what_the_store_lacks_and_a_restore_gets_every_byte(engine, tmp_path):
    bucket = engine.bucket()
    ram = make_snapshot(tmp_path / "base.snap")
    first = json.loads(run(engine, "push", str(tmp_path / "base.snap"), f"s3://{bucket}/base",
                           "--json").stdout)
    assert first["chunks_uploaded"] == first["chunks_unique"] > 0
    assert first["chunks_zero"] > 0 and first["bytes_uploaded"] > 0
    again = json.loads(run(engine, "push", str(tmp_path / "base.snap"),
                           f"s3://{bucket}/again", "--json").stdout)
    assert again["chunks_uploaded"] == 0 and again["bytes_uploaded"] == 0

    def a_few_pages(r):                      # a guest wrote a few MiB in one place
        r["pc.ram"].region[8 * MiB:9 * MiB] = os.urandom(MiB)

    make_snapshot(tmp_path / "next.snap", change=a_few_pages)
    nxt = json.loads(run(engine, "push", str(tmp_path / "next.snap"), f"s3://{bucket}/next",
                         "--json").stdout)
    assert 1 <= nxt["chunks_uploaded"] <= 2

    out = json.loads(run(engine, "load", f"s3://{bucket}/base", str(tmp_path / "ram"),
                         "--cache", str(tmp_path / "cache"), "--json").stdout)
    assert out["verified"] and out["fetch"]["fetched"] > 0
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == bytes(ram["pc.ram"].region)
    # a second restore on this host: every chunk from the local cache
    again = json.loads(run(engine, "load", f"s3://{bucket}/base", "--cache",
                           str(tmp_path / "cache"), "--json").stdout)
    assert again["fetch"]["fetched"] == 0 and again["fetch"]["cache_hits"] > 0
    ram.close()


def test_a_lazy_restore_from_the_store_is_verified_and_uses_the_working_set(engine, tmp_path):
    bucket = engine.bucket()
    ram = make_snapshot(tmp_path / "s.snap", layout="chunked")
    ram.close()
    # a first lazy restore of the local file records its working set; push carries it
    run(engine, "load", str(tmp_path / "s.snap"), "--lazy", "--hot-set", "64",
        "--no-background", "--window", "1")
    run(engine, "push", str(tmp_path / "s.snap"), f"s3://{bucket}/s")
    info = json.loads(run(engine, "info", f"s3://{bucket}/s", "--json").stdout)
    assert info["working_set_pages"] > 0
    out = json.loads(run(engine, "load", f"s3://{bucket}/s", "--lazy", "--hot-set", "64",
                         "--cache", str(tmp_path / "cache"), "--json").stdout)
    assert out["verified"]
    assert "working set" in out["working_set"] and out["prefetch_pages"] > 0


def test_pull_makes_a_local_chunked_snapshot_with_the_same_checksums(engine, tmp_path):
    bucket = engine.bucket()
    make_snapshot(tmp_path / "s.snap").close()
    run(engine, "push", str(tmp_path / "s.snap"), f"s3://{bucket}/s")
    run(engine, "pull", f"s3://{bucket}/s", str(tmp_path / "pulled.chk"), "--cache",
        str(tmp_path / "cache"))
    ours = snapshot.inspect(str(tmp_path / "s.snap"))
    pulled = snapshot.inspect(str(tmp_path / "pulled.chk"))
    assert pulled.layout == "chunked"
    assert [(b.name, b.xxh3_64) for b in pulled.blocks] == \
        [(b.name, b.xxh3_64) for b in ours.blocks]


def test_rm_and_gc_remove_only_what_no_snapshot_names(engine, tmp_path):
    bucket = engine.bucket()

    def other_pages(r):
        r["pc.ram"].region[0:4 * MiB] = os.urandom(4 * MiB)

    make_snapshot(tmp_path / "a.snap").close()
    make_snapshot(tmp_path / "b.snap", change=other_pages).close()
    run(engine, "push", str(tmp_path / "a.snap"), f"s3://{bucket}/a")
    run(engine, "push", str(tmp_path / "b.snap"), f"s3://{bucket}/b")
    run(engine, "rm", f"s3://{bucket}/a")
    gone = run(engine, "load", f"s3://{bucket}/a", check=False)
    assert gone.returncode == 1 and "no such snapshot" in gone.stderr
    dry = json.loads(run(engine, "gc", f"s3://{bucket}", "--grace", "0", "--dry-run",
                         "--json").stdout)
    assert dry["chunks_removed"] >= 4 and dry["snapshots"] == 1
    young = json.loads(run(engine, "gc", f"s3://{bucket}", "--json").stdout)
    assert young["chunks_removed"] == 0 and young["chunks_young"] == dry["chunks_removed"]
    done = json.loads(run(engine, "gc", f"s3://{bucket}", "--grace", "0", "--json").stdout)
    assert done["chunks_removed"] == dry["chunks_removed"]
    # b still restores, every byte
    out = json.loads(run(engine, "load", f"s3://{bucket}/b", "--cache",
                         str(tmp_path / "cache"), "--json").stdout)
    assert out["verified"]


def test_gc_waits_for_a_push_under_way(seaweed, tmp_path):
    """A push's lock keeps gc from removing a chunk the push counts on."""
    from qfram.store.client import ObjectStore
    from qfram.store.locks import Lock
    from qfram.store.url import Endpoint
    bucket = seaweed.bucket()
    make_snapshot(tmp_path / "a.snap", size=4 * MiB).close()
    run(seaweed, "push", str(tmp_path / "a.snap"), f"s3://{bucket}/a")
    store = ObjectStore(bucket, Endpoint(seaweed.endpoint, "qfram", "qfram-secret"))
    with Lock(store, "push"):
        blocked = subprocess.run(qfram("gc", f"s3://{bucket}", "--grace", "0",
                                       "--lock-wait", "1"), capture_output=True, text=True,
                                 env=seaweed.env, timeout=120)
    store.close()
    assert blocked.returncode == 1
    assert "a push is under way" in blocked.stderr and "Traceback" not in blocked.stderr


def test_a_name_inside_the_reserved_prefix_is_refused(seaweed, tmp_path):
    make_snapshot(tmp_path / "a.snap", size=4 * MiB).close()
    out = run(seaweed, "push", str(tmp_path / "a.snap"), "s3://qfram/.qfram/chunks/x",
              check=False)
    assert out.returncode == 1 and "qfram keeps for chunks" in out.stderr


def test_rewrite_takes_a_snapshot_from_the_store(seaweed, tmp_path):
    bucket = seaweed.bucket()
    make_snapshot(tmp_path / "a.snap", size=4 * MiB).close()
    run(seaweed, "push", str(tmp_path / "a.snap"), f"s3://{bucket}/a")
    run(seaweed, "rewrite", f"s3://{bucket}/a", str(tmp_path / "b.snap"), "--layout",
        "mapped", "--cache", str(tmp_path / "cache"))
    assert [b.xxh3_64 for b in snapshot.inspect(str(tmp_path / "b.snap")).blocks] == \
        [b.xxh3_64 for b in snapshot.inspect(str(tmp_path / "a.snap")).blocks]


def test_a_page_server_serves_a_snapshot_from_the_store_to_many_clones(seaweed, tmp_path):
    bucket = seaweed.bucket()
    make_snapshot(tmp_path / "a.snap", layout="chunked").close()
    run(seaweed, "push", str(tmp_path / "a.snap"), f"s3://{bucket}/a")
    sock = str(tmp_path / "pages.sock")
    server = subprocess.Popen(qfram("serve", f"s3://{bucket}/a", "--socket", sock, "--cache",
                                    str(tmp_path / "cache"), "--json"), env=seaweed.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.01)
        clones = [subprocess.Popen(qfram("load", f"s3://{bucket}/a", "--lazy", "--server",
                                         sock, "--json"), env=seaweed.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(3)]
        for c in clones:
            out, err = c.communicate(timeout=120)
            assert c.returncode == 0, err
            assert json.loads(out)["verified"]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=60)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["clients"] == 3 and stats["misses"] == stats["chunks_decoded"]


def test_save_goes_straight_to_the_store(seaweed, tmp_path):
    bucket = seaweed.bucket()
    out = json.loads(run(seaweed, "save", "--demo", "8M", f"s3://{bucket}/demo",
                         "--json").stdout)
    assert out["chunks_uploaded"] > 0 and out["url"] == f"s3://{bucket}/demo"
    back = json.loads(run(seaweed, "load", f"s3://{bucket}/demo", "--cache",
                          str(tmp_path / "cache"), "--json").stdout)
    assert back["verified"] and back["ram_bytes"] == 8 * MiB
