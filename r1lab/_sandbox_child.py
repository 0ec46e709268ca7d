"""Child side of r1lab.sandbox: runs one candidate program against its tests, inside the sandbox process.

r1lab.sandbox starts `python -I -S -B _sandbox_child.py` in a fresh temporary directory and writes a marshal'd
payload (code, tests, limits, a per-run nonce) to its stdin. This file then runs as __main__, in this order:

1. read the payload; stdin, stdout and stderr are pointed at /dev/null, and the real stdout is kept on a private
   fd that carries only the results, so the candidate's prints cannot garble them;
2. resource limits (CPU, address space, file size, open files, no core dumps);
3. when root and allowed: a private network namespace, and a drop to uid nobody that keeps only
   CAP_DAC_READ_SEARCH (the standard library may live under a root-only path such as /root/.pyenv); as nobody,
   RLIMIT_NPROC = 0 forbids forks at the OS level, which it does not for root;
4. an audit hook that refuses process creation, signals, sockets, ctypes, frame and gc introspection, raising
   limits, and writes outside the sandbox directory; audit hooks cannot be removed from Python code;
5. each test runs on a fresh execution of the candidate, and a line "<nonce> <index> ok|fail <reason>" is written
   per test, then "<nonce> done".

Why the nonce: the candidate runs in this process and can write to any fd; only lines carrying the nonce count,
and the nonce lives only in local variables, which the candidate cannot reach with frames and gc refused. Why
everything used after the candidate starts is bound beforehand (default arguments, locals): the candidate can
rebind module globals and builtins, this module's included (it is sys.modules["__main__"]).

Only built-in modules are imported (and resource/ctypes for setup), both for speed and so that no module holding
a fork primitive (_posixsubprocess) is loaded before the hook is in place.
"""

import builtins
import marshal
import os
import sys

NOBODY = 65534
CAP_DAC_READ_SEARCH, CAP_SETGID, CAP_SETUID = 2, 6, 7
CLONE_NEWNET = 0x40000000
PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 8, 38
CAPABILITY_VERSION_3 = 0x20080522
MAX_REASON_CHARS = 200

REFUSED_EVENTS = frozenset({
    # processes and signals
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "_thread.start_new_thread",
    "os.setns", "os.unshare",
    # limits: root could raise them again
    "resource.setrlimit", "resource.prlimit",
    # introspection that reaches this module's frames (and the nonce in them)
    "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.monitoring.register_callback",
    # links could point out of the sandbox directory
    "os.symlink",
})
REFUSED_PREFIXES = ("socket.", "ctypes.")
REFUSED_MODULES = frozenset({
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    "_testcapi", "_testinternalcapi",
    "gc",  # gc.garbage under DEBUG_SAVEALL would hand out collected frames; gc.set_debug raises no event
})
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
# event -> (positions of path arguments, positions of dir_fd arguments); every path must lie in the sandbox
PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
    "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
}
READ_DENIED_ROOTS = ("/proc", "/sys", "/dev")  # /proc/self/mem would expose the nonce; /dev holds devices
READ_ALLOWED_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
UNAUDITED_CALLS = (  # escape routes that raise no audit event, removed from their modules instead
    ("posix", "mkfifo"), ("posix", "mknod"), ("posix", "pidfd_open"), ("posix", "chroot"),
    ("os", "mkfifo"), ("os", "mknod"), ("os", "pidfd_open"), ("os", "chroot"),
    ("_signal", "pidfd_send_signal"), ("signal", "pidfd_send_signal"),
    ("_signal", "signal"), ("signal", "signal"),  # a handler receives the interrupted frame: this module's
)


# ---------------------------------------------------------------- setup, before any candidate code


def read_payload() -> dict:
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return marshal.loads(b"".join(chunks))
        chunks.append(chunk)


def redirect_stdio() -> int:
    """The private result fd; fds 0, 1 and 2 become /dev/null (reading stdin gives EOF, prints vanish)."""
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return result_fd


def limit_resources(cpu_s: int, memory_mb: int, file_mb: int, open_files: int) -> None:
    import resource

    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU first, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * mb, memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * mb, file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def set_capabilities(libc, ctypes, caps: list[int]) -> bool:
    """Effective and permitted capabilities become exactly caps (capset(2), version 3)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    mask = sum(1 << c for c in caps)
    data = (Data * 2)()
    data[0].effective = data[0].permitted = mask
    return libc.capset(ctypes.byref(Header(CAPABILITY_VERSION_3, 0)), data) == 0


def drop_privileges(libc, ctypes) -> bool:
    """Root -> uid/gid nobody keeping CAP_DAC_READ_SEARCH; False (still root) when the first step is refused.
    The parent has given the sandbox directory to nobody already.

    The capabilities are narrowed while still root, so a refusal leaves nothing half done; after setresuid the
    remaining narrowing only removes capabilities, which cannot be refused.
    """
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        return False
    if not set_capabilities(libc, ctypes, [CAP_DAC_READ_SEARCH, CAP_SETGID, CAP_SETUID]):
        return False
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    if not set_capabilities(libc, ctypes, [CAP_DAC_READ_SEARCH]):
        os._exit(3)  # cannot happen short of a kernel refusing to drop capabilities; never run code half-dropped
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return True


def isolate(network: bool, privileges: bool) -> list[str]:
    """Best-effort OS isolation for root; the names of the layers that took effect."""
    layers: list[str] = []
    if os.geteuid() == 0 and (network or privileges):
        try:
            import ctypes
        except ImportError:
            return layers
        libc = ctypes.CDLL(None, use_errno=True)
        if network and libc.unshare(CLONE_NEWNET) == 0:
            layers.append("netns")
        if privileges and drop_privileges(libc, ctypes):
            layers.append("uid")
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
            del sys.modules[name]  # a re-import would go through the audit hook, which refuses it
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no forks for any uid but root (set after setresuid)
    return layers


def disarm_unaudited() -> None:
    for module_name, attribute in UNAUDITED_CALLS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            delattr(module, attribute)


# ---------------------------------------------------------------- the audit hook


def make_normalizer(cwd_of=os.getcwd, str_=str, bytes_=bytes, type_=type):
    """A path -> absolute, lexically normalised str (None for anything but str/bytes), free of global lookups.

    Lexical is enough because the candidate cannot create symlinks; other path-like objects are refused so that
    an object whose __fspath__ changes between the check and the system call cannot slip through.
    """

    def normalize(path):
        kind = type_(path)
        if kind is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not str_:
            return None
        if not path.startswith("/"):
            path = cwd_of() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    return normalize


def make_hook(root: str):
    """The audit hook. Its state is bound as default arguments and closures: the function is reachable from
    nowhere once installed, and it looks nothing up in globals or builtins, which the candidate could rebind."""
    normalize = make_normalizer()

    def inside(path, _root=root, _prefix=root + "/"):
        return path is not None and (path == _root or path.startswith(_prefix))

    def check_open(args, _inside=inside, _normalize=normalize, _int=int, _type=type, _write=WRITE_FLAGS,
                   _denied=READ_DENIED_ROOTS, _devices=READ_ALLOWED_DEVICES, _stat=os.stat):
        path, flags = args[0], args[2]
        if _type(path) is _int:
            return  # an fd already open: its path was checked when it was opened
        absolute = _normalize(path)
        if absolute is None:
            raise PermissionError("sandbox: open() needs a str or bytes path")
        if _inside(absolute):
            return
        if _type(flags) is not _int or flags & _write:
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
        for denied in _denied:
            if (absolute == denied or absolute.startswith(denied + "/")) and absolute not in _devices:
                raise PermissionError(f"sandbox: reading {denied} is not allowed")
        try:
            is_dir = _stat(absolute).st_mode & 0o170000 == 0o040000
        except OSError:
            is_dir = False
        if is_dir:  # a directory fd outside the sandbox would let dir_fd-relative calls escape it
            raise PermissionError("sandbox: opening directories outside the sandbox is not allowed")

    def check_paths(event, args, _paths=PATH_EVENTS, _inside=inside, _normalize=normalize, _int=int, _type=type):
        path_positions, dir_fd_positions = _paths[event]
        for i in dir_fd_positions:
            if args[i] is not None and args[i] != -1:
                raise PermissionError(f"sandbox: {event} with dir_fd is not allowed")
        for i in path_positions:
            if event == "os.truncate" and _type(args[i]) is _int:
                continue  # ftruncate on an fd, which was checked when it was opened
            if not _inside(_normalize(args[i])):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed")

    def hook(event, args, _refused=REFUSED_EVENTS, _prefixes=REFUSED_PREFIXES, _modules=REFUSED_MODULES,
             _frames=FRAME_ATTRIBUTES, _paths=PATH_EVENTS, _check_open=check_open, _check_paths=check_paths):
        if event == "open":
            _check_open(args)
        elif event == "sys.addaudithook":
            raise RuntimeError("sandbox: no more audit hooks")  # RuntimeError: the hook is silently not added
        elif event in _refused or event.startswith(_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "import":
            if args[0] in _modules or args[0].partition(".")[0] in _modules:
                raise ImportError(f"sandbox: module {args[0]} is not allowed")
        elif event == "sys._getframe":
            raise ValueError("sandbox: frames are not available")  # ValueError: what stdlib callers expect
        elif event == "object.__getattr__":
            if args[1] in _frames:
                raise PermissionError("sandbox: frames are not available")
        elif event in _paths:
            _check_paths(event, args)

    return hook


# ---------------------------------------------------------------- running the tests


def make_strict_equal(type_=type, len_=len, abs_=abs, max_=max, list_=list, zip_=zip, range_=range):
    """strict_equal(actual, expected): == that also demands the same types, all the way down.

    The built-in code problems test with it, so that an object whose __eq__ always answers True (a known reward
    hack) does not pass. It runs after the candidate, so it too looks nothing up globally.
    """
    exact = (int, bool, str, bytes, type(None), complex)

    def strict_equal(actual, expected):
        kind = type_(expected)
        if type_(actual) is not kind:
            return False
        if kind in exact:
            return actual == expected
        if kind is float:
            return actual == expected or abs_(actual - expected) <= 1e-9 * max_(1.0, abs_(expected))
        if kind is list or kind is tuple:
            return len_(actual) == len_(expected) and all_same(actual, expected)
        if kind is dict:
            return len_(actual) == len_(expected) and unordered_same(list_(actual.items()), list_(expected.items()))
        if kind is set or kind is frozenset:
            return len_(actual) == len_(expected) and unordered_same(list_(actual), list_(expected))
        return False

    def all_same(actual, expected):
        for a, e in zip_(actual, expected):
            if not strict_equal(a, e):
                return False
        return True

    def unordered_same(actual, expected):
        left = list_(actual)  # O(n^2): hashing the candidate's objects would run its code
        for e in expected:
            for i in range_(len_(left)):
                if strict_equal(left[i], e):
                    left.pop(i)
                    break
            else:
                return False
        return True

    return strict_equal


def compile_or_reason(source: str, filename: str) -> tuple:
    """(code object, None), or (None, why it does not compile)."""
    try:
        return compile(source, filename, "exec"), None
    except BaseException as e:
        return None, f"{type(e).__name__}: {e}"


def run(code: str, tests: list, nonce: str, result_fd: int, hook) -> None:
    """Report each test as ok or fail on result_fd. Everything used once the candidate has run is a local."""
    write, exit_now, exec_, type_ = os.write, os._exit, exec, type
    as_str, exception_str, type_name = str.__str__, BaseException.__str__, type.__dict__["__name__"].__get__
    max_chars = MAX_REASON_CHARS
    pristine = dict(builtins.__dict__)
    strict_equal = make_strict_equal()
    program, program_error = compile_or_reason(code, "<candidate>")
    compiled = [compile_or_reason(test, "<test>") for test in tests]
    sys.addaudithook(hook)
    for index, (test, test_error) in enumerate(compiled):
        passed = False
        reason = program_error or (test_error and "test does not compile: " + test_error)
        if reason is None:
            try:
                namespace = {"__name__": "__main__", "__builtins__": pristine.copy()}
                exec_(program, namespace)
                # The test sees the candidate's names but pristine builtins and the trusted strict_equal: a
                # candidate that rebinds sorted() or len() cannot change what the test computes.
                scope = {k: v for k, v in namespace.items() if k not in pristine}
                scope.update({"__builtins__": pristine.copy(), "strict_equal": strict_equal})
                exec_(test, scope)
                passed = True
            except BaseException as e:
                try:
                    reason = as_str(f"{type_name(type_(e))}: {exception_str(e)}")
                except BaseException:
                    reason = "an exception that cannot be printed"
        status = "ok" if passed else "fail"
        reason = as_str(reason or "")[:max_chars].replace("\n", " ")
        write(result_fd, f"{nonce} {index} {status} {reason}\n".encode("utf-8", "replace"))
    write(result_fd, f"{nonce} done\n".encode())
    exit_now(0)  # no atexit handler or finalizer of the candidate runs after the report


def main() -> None:
    payload = read_payload()
    result_fd = redirect_stdio()
    limit_resources(payload["cpu_s"], payload["memory_mb"], payload["file_mb"], payload["open_files"])
    layers = isolate(payload["network_namespace"], payload["drop_privileges"])
    os.write(result_fd, f"{payload['nonce']} layers {','.join(layers) or '-'}\n".encode())
    disarm_unaudited()
    hook = make_hook(os.getcwd())
    run(payload["code"], payload["tests"], payload["nonce"], result_fd, hook)


if __name__ == "__main__":
    main()
