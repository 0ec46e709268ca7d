"""r1lab's CPU allocator (r1lab/cpu/allocator.py): blocks reused by size, never more held than the live peak, and
tensors that stay right. Each test runs in a fresh interpreter: the allocator is process-wide once installed."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

needs_compiler = pytest.mark.skipif(not sys.platform.startswith("linux") or not (shutil.which("c++") or shutil.which("g++")),
                                    reason="no C++ compiler on this machine")


def run(code: str, env_extra: dict | None = None) -> None:
    """Run code in a fresh interpreter; it prints "ok" when every check in it held."""
    env = {**os.environ, **(env_extra or {})}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok", done.stdout


@needs_compiler
def test_a_freed_block_serves_the_next_request_of_its_size_and_data_stay_right():
    run("""
        import torch
        from r1lab.cpu import allocator as cpu_allocator
        assert cpu_allocator.install() and cpu_allocator.installed()
        a = torch.full((1 << 20,), 3.0)                  # 4 MiB: one of ours
        address = a.data_ptr()
        del a
        assert cpu_allocator.stats()["kept"] == 4 << 20
        b = torch.full((1 << 20,), 5.0)
        s = cpu_allocator.stats()
        assert (s["reused"], s["mapped"], s["kept"], s["live"]) == (1, 1, 0, 4 << 20), s
        assert b.data_ptr() == address and bool((b == 5).all())  # the same block, rewritten
        del s
        before = cpu_allocator.stats()["live"]
        small = torch.ones(10)                            # glibc's, as before
        assert cpu_allocator.stats()["live"] == before
        x = torch.randn(300, 500, requires_grad=True)     # autograd's temporaries through it
        (x @ x.t()).relu().sum().backward()
        torch.testing.assert_close(x.grad, ((x @ x.t()) > 0).float() @ x.detach() * 2)
        print("ok")
    """)


@needs_compiler
def test_what_it_holds_never_passes_the_highest_live_total():
    run("""
        import random, torch
        from r1lab.cpu import allocator as cpu_allocator
        cpu_allocator.install()
        random.seed(0)
        live = []
        for step in range(3000):
            if live and random.random() < 0.5:
                live.pop(random.randrange(len(live)))
            else:
                live.append(torch.empty(random.choice([33, 64, 200, 1000, 4096]) << 10, dtype=torch.uint8))
            s = cpu_allocator.stats()
            assert s["live"] + s["kept"] <= s["peak_live"], (step, s)
        s = cpu_allocator.stats()
        assert s["reused"] + s["assembled"] > 10 * s["mapped"] and s["moved_bytes"] > s["fresh_bytes"], s
        live.clear()
        cpu_allocator.drop_kept()
        assert cpu_allocator.stats()["kept"] == 0
        print("ok")
    """)


@needs_compiler
def test_a_request_of_another_size_is_assembled_from_kept_pages_without_faulting_them_in():
    run("""
        import resource, torch
        from r1lab.cpu import allocator as cpu_allocator
        cpu_allocator.install()
        a, b, c = (torch.ones(1 << 20) for _ in range(3))    # 3 x 4 MiB, faulted in
        del a, b, c
        before = cpu_allocator.stats()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        big = torch.empty(5 << 20, dtype=torch.float16)     # 10 MiB: two kept blocks and half of the third
        big.fill_(2.0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        s = cpu_allocator.stats()
        assert s["assembled"] == before["assembled"] + 1 and s["fresh_bytes"] == before["fresh_bytes"], s
        assert s["moved_bytes"] - before["moved_bytes"] == 10 << 20 and s["kept"] == 2 << 20, s
        assert faults < 256, faults                          # 2,560 pages, fresh, would each fault
        assert big.min() == 2 and big.max() == 2
        del big
        assert cpu_allocator.stats()["kept"] == 12 << 20
        print("ok")
    """)


@needs_compiler
def test_uninstall_returns_allocation_to_torch_and_its_blocks_still_come_back():
    run("""
        import torch
        from r1lab.cpu import allocator as cpu_allocator
        cpu_allocator.install()
        ours = torch.empty(1 << 20)
        cpu_allocator.uninstall()
        assert not cpu_allocator.installed()
        theirs = torch.empty(1 << 20)
        assert cpu_allocator.stats()["live"] == 4 << 20    # the new tensor is torch's own
        del ours
        assert cpu_allocator.stats()["kept"] == 4 << 20    # ours came back to us
        del theirs
        print("ok")
    """)


def test_switched_off_or_without_a_compiler_torch_keeps_its_allocator(tmp_path):
    run("""
        import torch
        from r1lab.cpu import allocator as cpu_allocator
        assert not cpu_allocator.install() and not cpu_allocator.installed()
        print("ok")
    """, {"R1LAB_CPU_ALLOCATOR": "0"})
    run("""
        import warnings, torch
        from r1lab.cpu import allocator as cpu_allocator
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu_allocator.install()
        assert any("CPU allocator is not available" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("ok")
    """, {"CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")})


@needs_compiler
def test_a_large_model_on_the_cpu_installs_it_and_a_small_one_or_a_gpu_run_does_not(tmp_path):
    run(f"""
        from pathlib import Path
        from r1lab.cpu import allocator as cpu_allocator, process as runtime
        small, large = Path({str(tmp_path)!r}) / "small", Path({str(tmp_path)!r}) / "large"
        small.mkdir(); large.mkdir()
        (small / "model.safetensors").write_bytes(b"0" * 1000)
        with open(large / "model.safetensors", "wb") as f:
            f.truncate(runtime.LARGE_MODEL_BYTES)             # sparse: only its size is read
        runtime.setup_training_process(0, small, "cpu")
        assert not cpu_allocator.installed()
        runtime.setup_training_process(0, large, "cuda")     # the host's blocks are weights on their way
        assert not cpu_allocator.installed()
        runtime.setup_training_process(0, large, "cpu")
        assert cpu_allocator.installed()
        print("ok")
    """)


@needs_compiler
def test_a_fork_while_another_thread_allocates_leaves_the_child_working():
    run("""
        import os, threading, time, torch
        from r1lab.cpu import allocator as cpu_allocator
        cpu_allocator.install()
        stop = False
        def churn():
            while not stop:
                torch.empty(1 << 18)                      # 1 MiB: ours, in and out under the lock
        worker = threading.Thread(target=churn)
        worker.start()
        for _ in range(100):
            pid = os.fork()
            if pid == 0:
                torch.ones(1 << 20).sum()                 # takes the lock in the child
                os._exit(0)
            deadline = time.time() + 20
            while time.time() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert status == 0
                    break
                time.sleep(0.001)
            else:
                os.kill(pid, 9)
                raise SystemExit("a forked child hung on the allocator's lock")
        stop = True
        worker.join()
        print("ok")
    """)


@needs_compiler
def test_the_mappings_that_moved_pages_leave_stay_under_the_limit():
    """Blocks assembled from others' pages are several kernel mappings each; unbounded, a long run would reach
    vm.max_map_count and fail to allocate. Past half the limit (here set low) the allocator lets its kept blocks go."""
    run("""
        import random, torch
        from r1lab.cpu import allocator as cpu_allocator
        cpu_allocator.install()
        random.seed(0)
        pool, highest = [], 0
        for i in range(12_000):
            if len(pool) > 40:
                pool.pop(random.randrange(len(pool)))
            pool.append(torch.empty(random.randrange(33, 700) << 12, dtype=torch.uint8))
            if i % 500 == 0:
                highest = max(highest, sum(1 for _ in open("/proc/self/maps")))
        s = cpu_allocator.stats()
        assert s["drops"] >= 1 and s["assembled"] > 10_000, s
        assert highest < 3000, highest
        print("ok")
    """, {"R1LAB_ALLOCATOR_MAX_MAPPINGS": "1600"})
