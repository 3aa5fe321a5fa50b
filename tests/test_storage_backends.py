"""jckpt.storage on every backend: local files, memory, S3 (moto) and GCS (gcp-storage-emulator).

The S3 and GCS servers are real servers started by the fixtures in
``servers.py`` on 127.0.0.1; faults come from ``faultproxy.py`` sitting
between tensorstore and a server.  Nothing is mocked and nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import doctest
import errno
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import servers
import tensorstore as ts
from faultproxy import FaultProxy
from servers import HOST, free_port, new_bucket_name, s3_environment, start_moto

from jckpt import storage

# The server fixtures (one server per session, a fresh bucket per test).
server_logs = servers.server_logs
s3_server, gcs_server = servers.s3_server, servers.gcs_server
s3_root, gcs_root = servers.s3_root, servers.gcs_root

# Small backoff so that persistent failures fail in well under a second.
FAST_RETRIES = storage.Retries(max_retries=3, initial_delay="10ms", max_delay="50ms")
TOUGH_RETRIES = storage.Retries(max_retries=12, initial_delay="5ms", max_delay="20ms")

BACKENDS = ["file", "memory", "s3", "gcs"]


# -- pure: locations, environment, errors ---------------------------------------------------


def test_module_doctests():
    failures, tried = doctest.testmod(storage, optionflags=doctest.ELLIPSIS)
    assert tried > 10
    assert failures == 0


@pytest.mark.parametrize(
    "location, spec",
    [
        ("/ckpt", {"driver": "file", "path": "/ckpt/"}),
        ("/ckpt/", {"driver": "file", "path": "/ckpt/"}),
        ("file:///ckpt/run", {"driver": "file", "path": "/ckpt/run/"}),
        ("memory://scratch", {"driver": "memory", "path": "scratch/"}),
        ("s3://bkt", {"driver": "s3", "bucket": "bkt", "path": ""}),
        ("s3://bkt/", {"driver": "s3", "bucket": "bkt", "path": ""}),
        ("s3://bkt/a/b", {"driver": "s3", "bucket": "bkt", "path": "a/b/"}),
        ("s3://bkt//a//b/", {"driver": "s3", "bucket": "bkt", "path": "a/b/"}),
        ("gs://bkt/runs/7", {"driver": "gcs", "bucket": "bkt", "path": "runs/7/"}),
        ("gs://bkt", {"driver": "gcs", "bucket": "bkt", "path": ""}),
    ],
)
def test_kvstore_spec_of_each_location(location, spec):
    assert storage.kvstore_spec(location, environ={}) == spec


def test_a_relative_local_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.kvstore_spec("ckpt") == {"driver": "file", "path": f"{tmp_path}/ckpt/"}


@pytest.mark.parametrize(
    "location", ["http://host/x", "hdfs://nn/x", "s3://", "s3:///prefix", "gs://b/../x", "s3://b/a/./c"]
)
def test_unsupported_or_malformed_locations_are_value_errors(location):
    with pytest.raises(ValueError, match="checkpoint location|unsupported"):
        storage.kvstore_spec(location, environ={})


@pytest.mark.parametrize(
    "environ, settings",
    [
        ({}, {}),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, {"endpoint": "http://127.0.0.1:9000"}),
        ({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}, {"endpoint": "http://b:2"}),
        ({"AWS_ENDPOINT_URL_S3": "https://minio.lan/"}, {"endpoint": "https://minio.lan"}),
        ({"AWS_DEFAULT_REGION": "us-west-2"}, {"aws_region": "us-west-2"}),
        ({"AWS_DEFAULT_REGION": "us-west-2", "AWS_REGION": "eu-central-1"}, {"aws_region": "eu-central-1"}),
        ({"AWS_ENDPOINT_URL": ""}, {}),
    ],
)
def test_s3_endpoint_and_region_come_from_the_aws_variables(environ, settings):
    spec = storage.kvstore_spec("s3://bkt/run", environ=environ)
    assert spec == {"driver": "s3", "bucket": "bkt", "path": "run/", **settings}


@pytest.mark.parametrize(
    "host, endpoint",
    [
        ("127.0.0.1:9023", "http://127.0.0.1:9023"),
        ("http://127.0.0.1:9023", "http://127.0.0.1:9023"),
        ("http://localhost:9023/", "http://localhost:9023"),
        ("https://gcs.example", "https://gcs.example"),
        ("", None),
        (None, None),
    ],
)
def test_storage_emulator_host_maps_onto_a_gcs_endpoint(host, endpoint):
    environ = {} if host is None else {"STORAGE_EMULATOR_HOST": host}
    assert storage.gcs_endpoint(environ) == endpoint


def test_prepare_environment_sets_the_gcs_url_and_withdraws_it_with_its_source():
    gcs = storage.kvstore_spec("gs://bkt/run", environ={})
    environ = {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}
    storage.prepare_environment(gcs, environ)
    assert environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
    del environ["STORAGE_EMULATOR_HOST"]
    storage.prepare_environment(gcs, environ)
    assert "TENSORSTORE_GCS_HTTP_URL" not in environ


def test_prepare_environment_bounds_curl_stalls_but_keeps_a_users_setting():
    environ = {"TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "5"}
    storage.prepare_environment(storage.kvstore_spec("s3://bkt/run", environ={}), environ)
    assert environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] == "5"
    assert environ["TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"] == "16384"
    assert environ["TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS"] == "30"
    local = {}
    storage.prepare_environment(storage.kvstore_spec("/ckpt"), local)
    assert local == {}


@pytest.mark.parametrize(
    "message, kind",
    [
        (
            "NOT_FOUND: NoSuchBucket: The specified bucket does not exist [http_response_code='404']",
            FileNotFoundError,
        ),
        ("NOT_FOUND: Not Found [http_response_code='404']", FileNotFoundError),
        ("PERMISSION_DENIED: InvalidAccessKeyId: nope [http_response_code='403']", PermissionError),
        ("UNAUTHENTICATED: bad token [http_response_code='401']", PermissionError),
        (
            "ABORTED: All 3 retry attempts failed: CURL error Could not connect to server [curl_code='7']",
            ConnectionRefusedError,
        ),
        ("ABORTED: All 3 retry attempts failed: Operation too slow [curl_code='28']", TimeoutError),
        ("ABORTED: All 3 retry attempts failed: Recv failure [curl_code='56']", ConnectionError),
        ("ABORTED: All 8 retry attempts failed: SlowDown [http_response_code='503']", ConnectionError),
        ("ABORTED: All 8 retry attempts failed: SlowDown [http_response_code='429']", ConnectionError),
        ("UNAVAILABLE: try later", ConnectionError),
    ],
)
def test_tensorstore_errors_become_standard_ones_naming_where_and_step(message, kind):
    error = storage.translate_error(ValueError(message), "s3://bkt/run/step_00000007/manifest.json", step=7)
    assert type(error) is kind
    assert "s3://bkt/run/step_00000007/manifest.json" in str(error)
    assert "step 7" in str(error)
    assert message in str(error)


def test_local_io_errors_keep_their_errno():
    error = storage.translate_error(
        ValueError("Error writing local file \"/x\": [os_error_code='28'] No space left"), "/x"
    )
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert storage.as_os_error(ValueError("[os_error_code='28']")).errno == errno.ENOSPC


def test_other_errors_pass_through_unchanged():
    for error in (ValueError("INVALID_ARGUMENT: bad spec"), KeyError("k"), ValueError("plain")):
        assert storage.translate_error(error, "where") is error


# -- every backend: keys, listing, exact deletes --------------------------------------------


@pytest.fixture
def location(request, tmp_path):
    """The root URL of a fresh, empty checkpoint location on the backend named by the parameter."""
    backend = request.param
    if backend == "file":
        return str(tmp_path / "root")
    if backend == "memory":
        return f"memory://{new_bucket_name()}"
    return request.getfixturevalue({"s3": "s3_root", "gcs": "gcs_root"}[backend])


def open_store(location, retries=None):
    spec = storage.kvstore_spec(location)
    return spec, storage.open_kvstore(spec, storage.context(retries=retries))


@pytest.mark.parametrize("location", BACKENDS, indirect=True)
def test_keys_round_trip_and_a_missing_key_reads_as_none(location):
    _, kv = open_store(location)
    payload = bytes(range(256)) * 40
    storage.write(kv, "step_00000001/manifest.json", payload)
    assert storage.read(kv, "step_00000001/manifest.json") == payload
    assert storage.read(kv, "absent") is None
    storage.write(kv, "step_00000001/manifest.json", b"replaced")
    assert storage.read(kv, "step_00000001/manifest.json") == b"replaced"


EMULATOR_EMPTY_UPLOAD = pytest.mark.xfail(
    reason="gcp-storage-emulator crashes on a zero-byte upload (request.data is None); real GCS does not",
    raises=ConnectionError,
    strict=True,
)


@pytest.mark.parametrize(
    "location", ["file", "memory", "s3", pytest.param("gcs", marks=EMULATOR_EMPTY_UPLOAD)], indirect=True
)
def test_an_empty_value_round_trips(location):
    _, kv = open_store(location, retries=FAST_RETRIES)
    storage.write(kv, "empty", b"")
    assert storage.read(kv, "empty") == b""


# Keys that can all exist at once on a filesystem too (no key is also a "directory" of another).
PREFIX_CASES = ["a/b/x", "a/b/y/z", "a/b2", "a/bc", "ab", "a/c", "b/a/b"]


@pytest.mark.parametrize("location", BACKENDS, indirect=True)
def test_listing_is_sorted_and_a_prefix_is_a_plain_string_prefix(location):
    _, kv = open_store(location)
    for key in PREFIX_CASES:
        storage.write(kv, key, key.encode())
    assert storage.list_keys(kv) == sorted(PREFIX_CASES)
    assert storage.list_keys(kv, "a/b/") == ["a/b/x", "a/b/y/z"]
    assert storage.list_keys(kv, "a/b") == ["a/b/x", "a/b/y/z", "a/b2", "a/bc"]
    assert storage.list_keys(kv, "zzz") == []


def test_local_listing_leaves_out_lock_files(tmp_path):
    spec, kv = open_store(str(tmp_path))
    storage.write(kv, "k", b"v")
    (tmp_path / ("other" + storage.LOCK_SUFFIX)).write_bytes(b"stale")
    assert storage.list_keys(kv) == ["k"]


@pytest.mark.parametrize("location", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "delete, survivors",
    [
        (["a/b2"], ["a/b/x", "a/b/y/z", "a/bc", "a/c", "ab", "b/a/b"]),
        (["a/b/x"], ["a/b/y/z", "a/b2", "a/bc", "a/c", "ab", "b/a/b"]),
        (["a/b", "a/b/", "a/b/y", "absent"], PREFIX_CASES),
        (["a/b/y/z", "ab", "b/a/b"], ["a/b/x", "a/b2", "a/bc", "a/c"]),
    ],
)
def test_deletes_remove_exactly_the_keys_named(location, delete, survivors):
    _, kv = open_store(location)
    for key in PREFIX_CASES:
        storage.write(kv, key, key.encode())
    assert storage.delete_keys(kv, delete, batch=2) == len(delete)
    assert storage.list_keys(kv) == sorted(survivors)
    assert all(storage.read(kv, key) == key.encode() for key in survivors)


# On an object store a key may also be the "directory" of others.
NESTED = ["a/b", "a/b/c", "a/b/c/d", "a/b2", "a/bc", "a"]


@pytest.mark.parametrize("location", ["memory", "s3", "gcs"], indirect=True)
@pytest.mark.parametrize(
    "delete, survivors",
    [
        (["a/b"], ["a", "a/b/c", "a/b/c/d", "a/b2", "a/bc"]),
        (["a/b/c"], ["a", "a/b", "a/b/c/d", "a/b2", "a/bc"]),
        (["a"], ["a/b", "a/b/c", "a/b/c/d", "a/b2", "a/bc"]),
    ],
)
def test_deleting_a_key_spares_the_keys_it_prefixes(location, delete, survivors):
    _, kv = open_store(location)
    for key in NESTED:
        storage.write(kv, key, key.encode())
    storage.delete_keys(kv, delete)
    assert storage.list_keys(kv) == survivors


@pytest.mark.parametrize("location", BACKENDS, indirect=True)
def test_remove_tree_deletes_only_under_the_directory(location):
    spec, kv = open_store(location)
    for key in PREFIX_CASES:
        storage.write(kv, key, key.encode())
    assert storage.remove_tree(spec, kv, "a/b/") == 2
    assert storage.list_keys(kv) == ["a/b2", "a/bc", "a/c", "ab", "b/a/b"]
    with pytest.raises(ValueError, match="ending in '/'"):
        storage.remove_tree(spec, kv, "a/b")


@pytest.mark.slow
@pytest.mark.parametrize("location", BACKENDS, indirect=True)
def test_many_deletes_in_parallel_batches(location):
    _, kv = open_store(location)
    keys = [f"step_00000001/d0/c/{i}" for i in range(200)]
    futures = [kv.write(key, b"x") for key in keys]
    for future in futures:
        future.result()
    storage.write(kv, "step_00000002/manifest.json", b"m")
    assert storage.delete_keys(kv, keys, batch=64) == 200
    assert storage.list_keys(kv) == ["step_00000002/manifest.json"]


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_sibling_roots_in_one_bucket_never_see_each_others_keys(backend, request):
    """Regression: the GCS emulator ignores list ranges; listing must not mix roots (or crash)."""
    base = request.getfixturevalue(f"{backend}_root").rsplit("/", 1)[0]
    stores = {name: open_store(f"{base}/{name}")[1] for name in ("run", "run2", "r", "")}
    storage.write(stores[""], "x", b"top-level object shorter than every root's path")
    for name in ("run", "run2", "r"):
        storage.write(stores[name], "jckpt.json", name.encode())
        storage.write(stores[name], f"step_00000001/{name}", b"data")
    for name in ("run", "run2", "r"):
        assert storage.list_keys(stores[name]) == ["jckpt.json", f"step_00000001/{name}"]
        assert storage.list_keys(stores[name], "step_") == [f"step_00000001/{name}"]
    spec = storage.kvstore_spec(f"{base}/run")
    storage.remove_tree(spec, stores["run"], "step_00000001/")
    assert storage.list_keys(stores["run"]) == ["jckpt.json"]
    assert storage.list_keys(stores["run2"]) == ["jckpt.json", "step_00000001/run2"]
    assert storage.read(stores[""], "x") is not None


@pytest.mark.parametrize("location", BACKENDS, indirect=True)
def test_a_zarr3_array_round_trips_through_tensorstore(location):
    spec = storage.kvstore_spec(location)
    ctx = storage.context()
    kv = storage.open_kvstore(spec, ctx)  # a memory store lives as long as its context
    array_spec = storage.zarr3_spec(
        storage.join(spec, "step_00000001/d0/w"), [64, 48], "float32", [16, 48], "zstd"
    )
    data = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    array = ts.open(array_spec, create=True, context=ctx).result()
    array.write(data).result()
    reopened = ts.open({"driver": "zarr3", "kvstore": array_spec["kvstore"]}, context=ctx).result()
    np.testing.assert_array_equal(reopened.read().result(), data)
    assert storage.list_keys(kv) == [
        f"step_00000001/d0/w/{k}" for k in ["c/0/0", "c/1/0", "c/2/0", "c/3/0", "zarr.json"]
    ]


# -- local deletes never follow a symlink out of the root -----------------------------------


def test_local_deletes_do_not_follow_symlinks_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "precious").write_bytes(b"keep")
    (outside / "d" / "precious").write_bytes(b"keep")
    root = tmp_path / "root"
    spec, kv = open_store(str(root))
    storage.write(kv, "step_00000001/d0/c/0", b"x")
    os.symlink(outside, root / "step_00000001" / "d0" / "link")  # a symlinked directory inside a tree
    os.symlink(outside, root / "step_00000002")  # a whole step that is a symlink
    os.symlink(outside / "precious", root / "file_link")

    with pytest.raises(PermissionError, match="symlink"):
        storage.delete_keys(kv, ["step_00000002/precious"])
    storage.delete_keys(kv, ["file_link"])
    storage.remove_tree(spec, kv, "step_00000001/")
    storage.remove_tree(spec, kv, "step_00000002/")
    storage.remove_tree(spec, kv, "step_00000002/d/")

    assert (outside / "precious").read_bytes() == b"keep"
    assert (outside / "d" / "precious").read_bytes() == b"keep"
    assert sorted(os.listdir(root)) == []


# -- faults: retried when transient, clear and bounded when persistent ----------------------


@pytest.fixture(params=["s3", "gcs"])
def proxied(request, monkeypatch):
    """(root URL, proxy, server) with the client's endpoint pointing at a fault proxy before the server."""
    backend = request.param
    root = request.getfixturevalue(f"{backend}_root")
    server = request.getfixturevalue(f"{backend}_server")
    with FaultProxy(server.url, seed=1) as proxy:
        if backend == "s3":
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        else:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield root, proxy, server


@pytest.mark.slow
@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_failures_and_resets_are_retried_and_data_is_exact(proxied, status):
    root, proxy, _ = proxied
    _, kv = open_store(root, retries=TOUGH_RETRIES)
    proxy.configure(fail_rate=0.25, fail_status=status, drop_rate=0.15)
    values = {f"step_00000001/d0/c/{i}": os.urandom(1000 + i) for i in range(40)}
    for key, value in values.items():
        storage.write(kv, key, value)
    assert storage.list_keys(kv) == sorted(values)
    assert all(storage.read(kv, key) == value for key, value in values.items())
    storage.delete_keys(kv, list(values)[:20])
    assert storage.list_keys(kv) == sorted(list(values)[20:])
    assert proxy.injected["fail"] > 0 and proxy.injected["drop"] > 0


def test_the_proxy_counts_one_request_per_key_operation(proxied):
    root, proxy, _ = proxied
    _, kv = open_store(root)
    storage.write(kv, "warm", b"w")  # the first request of a store may carry a setup request
    proxy.reset_counts()
    storage.write(kv, "k", b"v" * 5000)
    storage.read(kv, "k")
    storage.list_keys(kv)
    storage.delete_keys(kv, ["k"])
    assert proxy.total == 4
    assert proxy.counts["DELETE"] == 1


def test_a_server_that_keeps_failing_gives_a_connection_error_naming_bucket_and_key(proxied):
    root, proxy, _ = proxied
    _, kv = open_store(root, retries=FAST_RETRIES)
    proxy.configure(down=True)
    bucket = root.split("/")[2]
    with pytest.raises(ConnectionError, match=rf"step 5, .*{bucket}/run/step_00000005/manifest.json"):
        storage.write(kv, "step_00000005/manifest.json", b"m", step=5)
    with pytest.raises(ConnectionError, match=bucket):
        storage.read(kv, "jckpt.json")
    with pytest.raises(ConnectionError, match=bucket):
        storage.list_keys(kv, "step_")
    with pytest.raises(ConnectionError, match=bucket):
        storage.delete_keys(kv, ["step_00000005/manifest.json"])


def test_a_dropped_connection_every_time_is_a_connection_error(proxied):
    root, proxy, _ = proxied
    _, kv = open_store(root, retries=FAST_RETRIES)
    proxy.configure(drop_rate=1.0)
    with pytest.raises(ConnectionError, match="retries used up"):
        storage.write(kv, "k", b"v")


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_an_endpoint_that_is_down_is_connection_refused(backend, request, monkeypatch):
    root = request.getfixturevalue(f"{backend}_root")
    dead = f"http://{HOST}:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL" if backend == "s3" else "STORAGE_EMULATOR_HOST", dead)
    _, kv = open_store(root, retries=FAST_RETRIES)
    with pytest.raises(ConnectionRefusedError, match="cannot reach the storage endpoint"):
        storage.write(kv, "jckpt.json", b"{}")
    with pytest.raises(ConnectionRefusedError, match=root.split("/")[2]):
        storage.read(kv, "jckpt.json")


def test_a_missing_s3_bucket_is_file_not_found_on_write_and_list(s3_root):
    root = "s3://no-such-bucket-jckpt/run"
    _, kv = open_store(root, retries=FAST_RETRIES)
    with pytest.raises(FileNotFoundError, match="no-such-bucket-jckpt/run/jckpt.json.*NoSuchBucket"):
        storage.write(kv, "jckpt.json", b"{}")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-jckpt"):
        storage.list_keys(kv)
    assert storage.read(kv, "jckpt.json") is None  # S3 answers 404 for the key as for the bucket


def test_a_missing_gcs_bucket_is_file_not_found_on_write(gcs_root):
    _, kv = open_store("gs://no-such-bucket-jckpt/run", retries=FAST_RETRIES)
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket-jckpt/run/jckpt.json"):
        storage.write(kv, "jckpt.json", b"{}")
    assert storage.read(kv, "jckpt.json") is None


@pytest.fixture(scope="module")
def checking_moto(server_logs):
    """A moto server that checks credentials (its IAM knows no access key, so every key is bad)."""
    server = start_moto(server_logs, extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    server.stop()


def test_bad_s3_credentials_are_a_permission_error(checking_moto, monkeypatch):
    for name, value in s3_environment(checking_moto.url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    _, kv = open_store("s3://some-bucket/run", retries=FAST_RETRIES)
    with pytest.raises(PermissionError, match="s3://some-bucket/run/jckpt.json.*InvalidAccessKeyId"):
        storage.write(kv, "jckpt.json", b"{}")
    with pytest.raises(PermissionError, match="some-bucket"):
        storage.list_keys(kv)


def test_a_server_that_never_answers_times_out(s3_server, tmp_path):
    """A hung server fails the request after curl's stall limit, then the retries: no hang.

    In a subprocess, because tensorstore reads the curl limits once per process.
    """
    script = textwrap.dedent(
        f"""
        import os, socket, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from faultproxy import FaultProxy
        from jckpt import storage
        with FaultProxy({s3_server.url!r}, timeout=60) as proxy:
            proxy.configure(stall=True)
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            spec = storage.kvstore_spec("s3://stalled/run")
            retries = storage.Retries(max_retries=2, initial_delay="10ms", max_delay="10ms")
            kv = storage.open_kvstore(spec, storage.context(retries=retries))
            try:
                storage.read(kv, "jckpt.json")
            except TimeoutError as e:
                print("TimeoutError:", e)
        """
    )
    env = {
        **os.environ,
        **s3_environment(s3_server.url),
        "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "1",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(storage.__file__)), os.environ.get("PYTHONPATH", "")]
        ),
    }
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert (
        "TimeoutError: [Errno 110] s3://stalled/run/jckpt.json: the storage server timed out" in done.stdout
    ), done.stdout + done.stderr[-3000:]
    assert time.monotonic() - start < 60


# -- end to end through jckpt.save / restore ------------------------------------------------


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_save_restore_delete_end_to_end(backend, request):
    import jax.numpy as jnp

    import jckpt

    root = request.getfixturevalue(f"{backend}_root")
    sibling = root + "-sibling"
    state = {"w": jnp.arange(12000.0).reshape(120, 100), "b": jnp.ones(3), "n": 3}
    jckpt.save(sibling, state, step=1)
    jckpt.save(root, state, step=1)
    jckpt.save(root, {**state, "b": jnp.zeros(3)}, step=2)
    assert jckpt.all_steps(root) == [1, 2]
    restored = jckpt.restore(root, step=1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    jckpt.delete(root, 1)
    assert jckpt.all_steps(root) == [2]
    np.testing.assert_array_equal(jckpt.restore(root)["b"], np.zeros(3))
    assert jckpt.all_steps(sibling) == [1], "deleting a step of one root touched another root"
