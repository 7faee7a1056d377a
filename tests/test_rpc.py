"""llama.cpp's RPC device as a GPU (labkit.rpc, labkit.offload; chapters 01, 03, 07, 08).

The parsing and the refusals run against fixtures in milliseconds; the `engine` tests start one
device per module and real llama-server processes on it, since what they check is the engine's own
placement and account.
"""
import time

import pytest

import labkit
from labkit import offload, rpc, servers
from labkit.env import free_port
from labkit.errors import DeviceUnreachableError, GPURequiredError

# What llama-server of the pinned build logged for SmolLM2 with -ngl 15 on one RPC device (trimmed).
PARTIAL_LOG = """\
load_tensors: loading model tensors, this can take a while... (mmap = true, direct_io = false)
load_tensors: offloading output layer to GPU
load_tensors: offloading 14 repeating layers to GPU
load_tensors: offloaded 15/31 layers to GPU
load_tensors:   CPU_Mapped model buffer size =    87.71 MiB
load_tensors: RPC0[127.0.0.1:50052] model buffer size =    58.28 MiB
llama_kv_cache:        CPU KV buffer size =    96.00 MiB
llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    84.00 MiB
sched_reserve:       RPC0[127.0.0.1:50052] compute buffer size =    66.50 MiB
sched_reserve:        CPU compute buffer size =     5.01 MiB
"""
# An offload-capable build with no device: it still logs "offloaded 31/31", every buffer is a CPU one.
NO_DEVICE_LOG = """\
load_tensors: offloaded 31/31 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   145.99 MiB
llama_kv_cache:        CPU KV buffer size =   180.00 MiB
"""
# llama-cpp-python built for the CPU: no offload line at all.
CPU_BUILD_LOG = """\
load_tensors:   CPU_REPACK model buffer size =    50.00 MiB
load_tensors:   CPU_Mapped model buffer size =   145.99 MiB
"""


def test_account_reads_assignment_and_buffers():
    a = offload.account(PARTIAL_LOG)
    assert (a.offloaded, a.total) == (15, 31)
    assert a.device_mib() == {"RPC0[127.0.0.1:50052]": pytest.approx(58.28 + 84.00 + 66.50)}
    assert a.device_mib("KV") == {"RPC0[127.0.0.1:50052]": 84.0}
    assert a.host_mib("model") == 87.71 and a.host_mib("KV") == 96.0
    assert a.on_device and not a.fully_offloaded
    assert a.verdict.startswith("Partial offload: 15 of 31")


def test_an_offload_line_without_device_buffers_is_a_cpu_fallback():
    a = offload.account(NO_DEVICE_LOG)
    assert a.offloaded == 31 and not a.on_device and not a.fully_offloaded
    assert a.verdict.startswith("CPU only") and "offloaded 31/31" in a.verdict
    b = offload.account(CPU_BUILD_LOG)
    assert b.offloaded is None and b.host_mib() == pytest.approx(195.99) and b.verdict.startswith("CPU only")


def test_the_last_load_counts():
    full = PARTIAL_LOG.replace("15/31", "31/31").replace("size =    87.71", "size =    20.00")
    a = offload.account(PARTIAL_LOG + full)
    assert a.fully_offloaded and a.host_mib("model") == 20.0


@pytest.mark.parametrize("name, host", [("CPU", True), ("CPU_Mapped", True), ("CPU_REPACK", True), ("AMX", True),
                                        ("CUDA_Host", True), ("CUDA0", False), ("Metal", False),
                                        ("RPC1[10.0.0.2:50052]", False), ("Vulkan0", False)])
def test_host_and_device_buffers(name, host):
    assert offload.is_host_buffer(name) is host


def test_unreachable_endpoint_is_refused_before_anything_starts():
    dead = f"127.0.0.1:{free_port()}"
    assert not rpc.reachable(dead)
    before = set(servers.running())
    with pytest.raises(DeviceUnreachableError, match="labkit.serve\\('rpc'\\).*gpu_only=False"):
        labkit.serve("llama-server", "smollm2", rpc=dead)
    assert set(servers.running()) == before


def test_cpu_fallback_drops_dead_endpoints_with_a_warning(capsys):
    dead = f"127.0.0.1:{free_port()}"
    assert rpc.check_endpoints(dead, gpu_only=False) is None
    assert "dropped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="HOST:PORT"):
        rpc.check_endpoints(" , ")


def test_rpc_is_refused_where_the_engine_cannot_use_it():
    with pytest.raises(ValueError, match="llama-server"):
        labkit.serve("llama.cpp", "smollm2", rpc="127.0.0.1:1")


def test_fail_fast_names_what_did_not_fit():
    with pytest.raises(GPURequiredError, match="only 15 of 31 layers.*RPC0.*gpu_only=False"):
        rpc.require_full_offload(offload.account(PARTIAL_LOG), "smollm2", "127.0.0.1:50052")
    with pytest.raises(GPURequiredError, match="no layer of smollm2"):
        rpc.require_full_offload(offload.account(NO_DEVICE_LOG), "smollm2", None)
    rpc.require_full_offload(offload.account(PARTIAL_LOG.replace("15/31", "31/31")), "smollm2", "x:1")


# ----------------------------------------------------------------------------- the real device
needs_rpc = pytest.mark.skipif(not rpc.built(), reason="llama.cpp's ggml-rpc-server is not built: make setup")


def _echo_device():
    """A stand-in device: a TCP server that answers every message with twice its bytes."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data * 2)
    threading.Thread(target=serve, daemon=True).start()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


def test_wire_counter_relays_and_counts_both_ways():
    import socket
    listener, endpoint = _echo_device()
    try:
        with rpc.WireCounter(endpoint) as wire:
            assert wire.endpoint != endpoint and wire.counts() == (0, 0)
            host, _, port = wire.endpoint.rpartition(":")
            with socket.create_connection((host, int(port))) as client:
                client.sendall(b"x" * 1000)
                got = b""
                while len(got) < 2000:
                    got += client.recv(4096)
            deadline = time.time() + 2
            while wire.counts() != (1000, 2000) and time.time() < deadline:
                time.sleep(0.01)
            assert got == b"x" * 2000 and wire.counts() == (1000, 2000)
        assert not rpc.reachable(wire.endpoint)          # closed: nothing listens any more
    finally:
        listener.close()


def test_wire_counter_refuses_a_dead_device():
    with pytest.raises(DeviceUnreachableError):
        rpc.WireCounter(f"127.0.0.1:{free_port()}")


def test_wire_per_token_counts_decode_only():
    from types import SimpleNamespace

    from labkit import deploy

    class Wire:                                          # counters that move as the fake engine streams
        def __init__(self):
            self.to, self.back = 10_000, 50_000           # the prompt's traffic, before the first token

        def counts(self):
            return self.to, self.back

    wires = [Wire(), Wire()]

    def stream(**_):
        for i in range(5):
            if i:                                        # each token after the first: 100 B out, 4000 B back per device
                for w in wires:
                    w.to, w.back = w.to + 100, w.back + 4000
            yield SimpleNamespace(choices=[SimpleNamespace(text="tok")])
        yield SimpleNamespace(choices=[])                # a usage-only chunk counts for nothing

    server = SimpleNamespace(model="m", openai=lambda: SimpleNamespace(completions=SimpleNamespace(create=stream)))
    rows = deploy.wire_per_token(server, wires, "prompt", max_tokens=5)
    assert [(r["to device B/token"], r["from device B/token"], r["tokens"]) for r in rows] == [(100, 4000, 5)] * 2
    with pytest.raises(RuntimeError, match="at least 3"):
        deploy.wire_per_token(SimpleNamespace(model="m", openai=lambda: SimpleNamespace(completions=SimpleNamespace(
            create=lambda **_: iter([SimpleNamespace(choices=[SimpleNamespace(text="a")])])))), wires, "p")


@pytest.fixture(scope="module")
def device():
    with labkit.serve("rpc") as dev:
        yield dev


@pytest.mark.engine
@needs_rpc
def test_device_memory_is_what_the_engine_sees(device):
    free, total = rpc.memory(device.endpoint)
    assert 0 < free <= total
    assert device.alive()


@pytest.mark.engine
@needs_rpc
def test_engine_offloads_to_the_device_and_its_account_says_so(device):
    with labkit.serve("llama-server", "smollm2", rpc=device.endpoint, ctx_size=512) as srv:
        a = offload.account(srv.log_path.read_text())
        assert a.fully_offloaded and list(a.device_mib("model")) == [f"RPC0[{device.endpoint}]"], a
        reply = srv.openai().completions.create(model=srv.model, prompt="The capital of France is", max_tokens=4)
        assert reply.choices[0].text
    with labkit.serve("llama-server", "smollm2", rpc=device.endpoint, ctx_size=512, n_gpu_layers=10) as part:
        p = offload.account(part.log_path.read_text())
        assert (p.offloaded, p.on_device, p.fully_offloaded) == (10, True, False), p


@pytest.mark.full     # chapter 01 (6c) caps the device and checks the fit in make test
@pytest.mark.engine
@needs_rpc
def test_a_capped_device_gets_a_partial_offload_and_gpu_only_refuses_it(device):
    cap = rpc.capped(device.endpoint, 100)
    before = set(servers.running())
    with pytest.raises(GPURequiredError, match="layers of smollm2 fit"):
        labkit.serve("llama-server", "smollm2", ctx_size=512, **cap)
    assert set(servers.running()) == before                   # the refused server is stopped
    with labkit.serve("llama-server", "smollm2", ctx_size=512, gpu_only=False, **rpc.capped(device.endpoint, 100)) as srv:
        a = offload.account(srv.log_path.read_text())
    assert a.on_device and 0 < a.offloaded < a.total, a
    assert sum(a.device_mib().values()) <= 100 * 1.1, a      # the fit honoured the cap (test allocations aside)
    # a device smaller than the output layer and the compute buffer (28.7 + 13 MiB for SmolLM2): nothing goes there
    with pytest.raises(GPURequiredError, match="no layer of smollm2"):
        labkit.serve("llama-server", "smollm2", ctx_size=512, **rpc.capped(device.endpoint, 8))
    assert set(servers.running()) == before


@pytest.mark.engine
@needs_rpc
def test_a_device_killed_mid_generation_leaves_nothing_wedged():
    """llama.cpp aborts when its device goes away; labkit says why, and nothing is left running."""
    import psutil
    dev = labkit.serve("rpc")
    srv = labkit.serve("llama-server", "smollm2", rpc=dev.endpoint, ctx_size=512)
    pids = srv.pids() + dev.pids()
    try:
        assert srv.why_stopped() is None
        client = srv.openai(max_retries=0, timeout=30)
        dev.stop()
        t0 = time.monotonic()
        with pytest.raises(Exception):
            client.completions.create(model=srv.model, prompt="Once upon a time", max_tokens=32)
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while srv.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "RPC device went away" in (srv.why_stopped() or ""), srv.logs()
    finally:
        srv.stop()
        dev.stop()
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
