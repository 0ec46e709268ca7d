"""Child side of r1lab.rewards.sandbox.runner: runs a candidate program inside the boundary and calls it with each
test's arguments (as `--server`: the fork server of tool calls).

Started as `python -I -S -B child.py` with a marshal'd payload on stdin: the code, the limits, and per test only the
calls to make; what a test expects, and any secret, never reaches this process. In this order: stdio to /dev/null
(results on a private fd); resource limits; the confinement (as root under bubblewrap a drop to uid nobody; in every
mode no new privileges, no capability and no forks; Landlock rules for "landlock"), where a step that fails exits
with SETUP_FAILED_STATUS before any candidate code runs; an audit hook (irremovable from Python) that refuses process
creation, signals, sockets, ctypes, frame and gc introspection, raising limits, directory fds and writes outside the
working directory; then per test a fresh execution and "<index> ok <values>" (make_encoder's syntax) or "<index> fail
<reason>", then "done". A tool call (payload "program") runs once with fds 1 and 2 on the parent's pipe.

The candidate can write any line on any fd: the parent takes the first line per test and trusts none (a forged line
only claims return values, which are judged). Everything used after the candidate starts is bound beforehand
(default arguments, locals): it can rebind module globals and builtins, this module's included. Only built-in
modules are imported (and resource, ctypes, landlock for setup): nothing holding a fork primitive before the hook.
"""

import builtins
import marshal
import os
import sys
import time

NOBODY = 65534
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 23, 24, 38, 39, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LAST_CAPABILITY = 63  # the bounding set is dropped up to this; prctl refuses numbers past the kernel's last
CAPABILITY_VERSION_3 = 0x20080522
SIGXCPU = 24
SETUP_FAILED_STATUS = 71  # the confinement could not be applied: nothing ran
MAX_REASON_CHARS = 200
MAX_VALUE_CHARS = 1 << 16  # one test's encoded return values; r1lab.rewards.sandbox.judge.MAX_VALUE_CHARS
MAX_VALUE_DEPTH = 100
SERVER_FLAG = "--server"  # argv of the fork server (r1lab.rewards.sandbox.runner.run_program_pooled)
STALE_FILES_STATUS = 90  # a call's child could not clear the previous call's files: the server must be replaced
MAX_CLEAR_DEPTH = 40  # directory levels a child clears (it holds an fd per level, under the open-files limit)
SIGKILL = 9

REFUSED_EVENTS = frozenset({
    # processes and signals
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "_thread.start_new_thread",
    "os.setns", "os.unshare",
    # limits: root could raise them again
    "resource.setrlimit", "resource.prlimit",
    # introspection: frames and gc reach this module's frames; they hold nothing secret, but nothing should
    # reach them either
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
    "_posixshmem", "_multiprocessing",  # shm_open/sem_open create files in /dev/shm with no "open" event
})
# importlib.import_module() raises no "import" event for built-in modules: they are all imported before the hook
# (but the refused ones), and _imp.create_builtin, the only way to make another, is replaced by refuse_builtin

FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
# event -> (positions of path arguments, positions of dir_fd arguments); every path must lie in the sandbox
PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
    "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
}
READ_DENIED_ROOTS = ("/proc", "/sys", "/dev")  # /proc/<ppid>/environ holds the trainer's secrets; /dev devices
READ_ALLOWED_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
DIRECTORY_FLAGS = getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_PATH", 0)
O_TMPFILE = getattr(os, "O_TMPFILE", -1)  # includes O_DIRECTORY's bit, yet opens a new unnamed file in the directory
UNAUDITED_CALLS = (  # escape routes that raise no audit event, removed from their modules instead
    ("posix", "mkfifo"), ("posix", "mknod"), ("posix", "pidfd_open"), ("posix", "chroot"),
    ("os", "mkfifo"), ("os", "mknod"), ("os", "pidfd_open"), ("os", "chroot"),
    ("_signal", "pidfd_send_signal"), ("signal", "pidfd_send_signal"),
    ("_signal", "signal"), ("signal", "signal"),  # a handler receives the interrupted frame: this module's
)


def read_payload() -> dict:
    return marshal.loads(b"".join(iter(lambda: os.read(0, 1 << 16), b"")))


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


def confine(config: dict) -> list[str]:
    """The uid, the capabilities and no forks (RLIMIT_NPROC binds every uid but the host's root: what root forks
    under r1lab's own boundary dies with its PID namespace, or by end_strays). The layers applied; exits on failure."""
    layers = []
    if config["boundary"] == "bwrap" and os.geteuid() == 0:
        drop_to_nobody()
        layers.append("uid")
    if not drop_capabilities():  # under bubblewrap too: it leaves the child capabilities in its inheritable set
        os._exit(SETUP_FAILED_STATUS)
    layers.append("nocaps")
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # set after setresuid: it counts the new uid's processes
    return layers


def drop_to_nobody() -> None:
    """Under bubblewrap: root -> uid/gid nobody, or exit. With no PR_SET_KEEPCAPS, moving every uid off 0 clears all
    capabilities, and bubblewrap's mounts make the interpreter readable to nobody without CAP_DAC_READ_SEARCH."""
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    except OSError:
        os._exit(SETUP_FAILED_STATUS)


def drop_capabilities() -> bool:
    """No new privileges, and no capability in any set (effective, permitted, inheritable, ambient and, for root,
    bounding). Root stays uid 0 (an interpreter under /root stays readable), with the rights of file ownership alone,
    which the boundary confines. True when the kernel confirms every set empty."""
    try:
        import ctypes
    except ImportError:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
            return False
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL before Linux 4.3: none to clear
        for capability in range(LAST_CAPABILITY + 1):
            if libc.prctl(PR_CAPBSET_READ, capability, 0, 0, 0) == 1 and \
                    libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and os.geteuid() == 0:
                return False  # root may drop them all; anyone else has none to use (no new privileges)
        header, data = capability_structures(ctypes)  # zeroed: capset(2) empties every set
        if libc.capset(ctypes.byref(header), data) != 0:
            return False
        header, data = capability_structures(ctypes)
        return libc.capget(ctypes.byref(header), data) == 0 and not any(
            getattr(half, name) for half in data for name in ("effective", "permitted", "inheritable"))
    finally:
        ctypes.set_errno(0)  # the landlock package reads errno after its calls: no stale EINVAL from here


def capability_structures(ctypes):
    """capset(2)/capget(2)'s header (version 3) and its two 32-bit halves of each set, zeroed."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    return Header(CAPABILITY_VERSION_3, 0), (Data * 2)()


def forget_setup_modules() -> None:
    """ctypes and landlock leave sys.modules: a re-import goes through the audit hook, which refuses ctypes."""
    for name in [m for m in sys.modules if m in ("ctypes", "landlock") or m.startswith(("ctypes.", "_ctypes",
                                                                                          "landlock."))]:
        del sys.modules[name]


def confine_filesystem(config: dict, workdir: str) -> list[str]:
    """For the "landlock" boundary: Landlock rules that refuse every file access but reading what the parent listed,
    the usual devices, and everything inside workdir; judged on the file reached, whatever path or fd led there.
    Exits if the kernel refuses them: the boundary was asked for, and is never silently missing."""
    if config["boundary"] != "landlock":
        return []
    rules = config["landlock"]
    try:
        sys.path.insert(0, rules["package"])
        try:
            import landlock
        finally:
            del sys.path[0]
        access = landlock.FSAccess
        device = access.all_file() & ~access.EXECUTE  # read, write, truncate, and its ioctls
        ruleset = landlock.Ruleset()  # handles every access right this kernel knows: what no rule grants is refused
        ruleset.allow(*rules["read_dirs"], rules=access.READ_FILE | access.READ_DIR)
        ruleset.allow(*rules["read_files"], rules=access.READ_FILE)
        ruleset.allow(*rules["devices"], rules=device)
        ruleset.allow(workdir, rules=access.all() & ~access.EXECUTE)
        ruleset.apply()
        os.close(ruleset._fd)  # the package keeps it open; the domain now in force cannot be widened through it
    except BaseException:  # noqa: B036: whatever went wrong, nothing may run unconfined
        os._exit(SETUP_FAILED_STATUS)
    return ["landlock"]


def exit_on_cpu_limit() -> None:
    """The first process of a PID namespace (under unshare) ignores the signals it has no handler for, SIGXCPU
    included; with this handler the CPU limit ends it as SIGXCPU would, with the status a shell gives for it."""
    import _signal

    _signal.signal(SIGXCPU, lambda signum, frame, _exit=os._exit: _exit(128 + SIGXCPU))


def refuse_builtin(spec, *args):
    raise ImportError(f"sandbox: module {getattr(spec, 'name', spec)} is not allowed")


def refuse_thread(*args, **kwargs):
    # What threading raises where RLIMIT_NPROC refuses the clone: the limit does not bind the host's root (r1lab's
    # own boundary keeps uid 0), and before Python 3.13 starting a thread raises no audit event.
    raise RuntimeError("can't start new thread")


def import_builtins() -> None:
    """Every built-in module but the refused ones: no file, nothing run but the module's init."""
    for name in sys.builtin_module_names:
        if name not in REFUSED_MODULES and name not in sys.modules:
            __import__(name)


def disarm_unaudited() -> None:
    import types  # noqa: F401: importing it reads a traceback's tb_frame, which the hook refuses afterwards

    import_builtins()
    imp = sys.modules["_imp"]
    imp.create_builtin = refuse_builtin
    imp.create_dynamic = guard_extensions(imp.create_dynamic)
    for name in ("start_new_thread", "start_joinable_thread"):  # replaced, not removed: `import threading` works
        if hasattr(sys.modules["_thread"], name):
            setattr(sys.modules["_thread"], name, refuse_thread)
    for module_name, attribute in UNAUDITED_CALLS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attribute):
            delattr(module, attribute)


def guard_extensions(create_dynamic):
    """_imp.create_dynamic, checked: only extension modules of this Python installation, none refused (the real one
    raises no "import" event for the setup's own _ctypes, and would dlopen a library the candidate wrote). It lives
    only in a generator's frame, which nothing reaches (the hook refuses frames, gc is refused); send() talks to it."""
    allowed = tuple(p + "/" for p in sys.path if p.startswith("/"))  # the installation's own directories
    loader = load_extensions(create_dynamic, sys.modules["_frozen_importlib"].ModuleSpec, allowed,
                             make_normalizer())
    next(loader)

    def guarded(spec, file=None, _send=loader.send, _error=ImportError):
        module, error = _send(spec)
        if error is not None:
            raise _error(error)
        return module

    return guarded


def load_extensions(create_dynamic, spec_type, allowed, normalize, refused=REFUSED_MODULES, type_=type, str_=str,
                    getattr_=getattr, any_=any):
    """Generator: receives a spec, answers (module, None) or (None, why not). The name and origin are read
    once and a fresh spec is built from them, so a spec whose attributes change between reads gains nothing."""
    spec = yield
    while True:
        name, origin = getattr_(spec, "name", None), getattr_(spec, "origin", None)
        answer = None, "sandbox: this extension module is not allowed"
        if type_(name) is str_ and type_(origin) is str_:
            path = normalize(origin)
            if (name not in refused and name.partition(".")[0] not in refused and path is not None
                    and any_(path.startswith(d) for d in allowed)):
                try:
                    answer = create_dynamic(spec_type(name, None, origin=path)), None
                except BaseException as e:  # noqa: B036: handed back as an ImportError outside this frame
                    answer = None, f"{type_(e).__name__}: {e}"
        spec = yield answer


def make_normalizer(cwd_of=os.getcwd, str_=str, bytes_=bytes, type_=type):
    """A path -> absolute, lexically normalised str, free of global lookups: lexical is enough, as the candidate
    cannot create symlinks; None for anything but str/bytes (a __fspath__ could change between check and use)."""

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


def make_open_check(inside, normalize):
    """The check of the "open" event: reads anywhere but /proc, /sys and devices, writes inside the sandbox
    directory only, and no directory fd at all."""

    def check_open(args, _inside=inside, _normalize=normalize, _int=int, _type=type, _write=WRITE_FLAGS,
                   _dirs=DIRECTORY_FLAGS, _tmpfile=O_TMPFILE, _denied=READ_DENIED_ROOTS,
                   _devices=READ_ALLOWED_DEVICES, _stat=os.stat):
        path, mode, flags = args
        if _type(path) is _int:
            return  # an fd already open: its path was checked when it was opened
        absolute = _normalize(path)
        if absolute is None or _type(flags) is not _int:
            raise PermissionError("sandbox: open() needs a str or bytes path and int flags")
        # The event does not carry dir_fd, so the path checked here may not be the path opened: os.open (mode
        # None) may open no directory anywhere, which leaves no fd to pass as dir_fd (and there is no thread to
        # swap a file for a directory between this stat and the open). io.open (a str mode) cannot return a
        # directory fd, and with an opener it names the directory the opener's own os.open creates a file in.
        if mode is None and flags & _tmpfile != _tmpfile:
            try:
                is_dir = _stat(absolute).st_mode & 0o170000 == 0o040000
            except OSError:
                is_dir = False
            if is_dir or flags & _dirs:
                raise PermissionError("sandbox: opening directories is not allowed")
        if _inside(absolute):
            return
        if flags & _write:
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
        for denied in _denied:
            if (absolute == denied or absolute.startswith(denied + "/")) and absolute not in _devices:
                raise PermissionError(f"sandbox: reading {denied} is not allowed")

    return check_open


def make_hook(root: str):
    """The audit hook. Its state is bound as default arguments and closures: the function is reachable from
    nowhere once installed, and it looks nothing up in globals or builtins, which the candidate could rebind."""
    normalize = make_normalizer()

    def inside(path, _root=root, _prefix=root + "/"):
        return path is not None and (path == _root or path.startswith(_prefix))

    check_open = make_open_check(inside, normalize)

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


def make_scalar_text(int_repr=int.__repr__, float_repr=float.__repr__, str_repr=str.__repr__,
                     bytes_repr=bytes.__repr__):
    """scalar_text(value, its exact type) -> its literal text, or None for a type that is not a plain scalar."""

    def scalar_text(value, kind):
        if kind is complex:
            return "complex(" + scalar_text(value.real, float) + ", " + scalar_text(value.imag, float) + ")"
        if kind is int:
            return int_repr(value)  # ValueError past sys.get_int_max_str_digits: too long anyway
        if kind is bool or kind is type(None):
            return "True" if value is True else "False" if value is False else "None"
        if kind is float:
            return float_repr(value) if value - value == 0 else "nan" if value != value else \
                "inf" if value > 0 else "-inf"
        if kind is str:
            return str_repr(value)
        if kind is bytes:
            return bytes_repr(value)
        return None

    return scalar_text


def make_encoder(type_=type, dict_items=dict.items, len_=len, max_chars=MAX_VALUE_CHARS,
                 max_depth=MAX_VALUE_DEPTH):
    """encode(value) -> the value in the restricted literal syntax r1lab.rewards.sandbox.judge.parse_values reads
    (inf and nan as names). Only exact built-in types (a subclass could override __eq__ or __repr__), through their
    own C methods bound before the candidate runs; anything else, too deep or too long raises ValueError."""
    scalar_text = make_scalar_text()

    def encode(value):
        out = []
        size = [0]
        put(value, out, size, 0)
        return "".join(out)

    def emit(text, out, size):
        size[0] += len_(text)
        if size[0] > max_chars:
            raise ValueError(f"the return values are longer than {max_chars} characters")
        out.append(text)

    def put(value, out, size, depth):
        kind = type_(value)
        if depth > max_depth:
            raise ValueError("the return value is nested too deeply")
        text = scalar_text(value, kind)
        if text is not None:
            emit(text, out, size)
        else:
            put_container(kind, value, out, size, depth)

    def put_container(kind, value, out, size, depth):
        if kind is dict:
            emit("{", out, size)
            for key, item in dict_items(value):
                put(key, out, size, depth + 1)
                emit(": ", out, size)
                put(item, out, size, depth + 1)
                emit(", ", out, size)
            emit("}", out, size)
            return
        opening, closing = {list: ("[", "]"), tuple: ("(", ")"), set: ("{", "}"),
                            frozenset: ("frozenset([", "])")}.get(kind, (None, None))
        if opening is None:
            raise ValueError(f"returned a {kind.__name__}: only plain data (numbers, strings, bytes, None, "
                             f"and lists, tuples, dicts, sets of them) can be judged")
        if kind is set and not value:
            emit("set()", out, size)
            return
        emit(opening, out, size)
        for item in value:  # iterating an exact built-in container runs none of the candidate's code
            put(item, out, size, depth + 1)
            emit(", ", out, size)
        emit(closing, out, size)  # "(1, )" and "[1, 2, ]": a trailing comma keeps the one-tuple a tuple

    return encode


def run(code: str, tests: list, result_fd: int, hook) -> None:
    """For each test: run the program afresh, make the test's calls, report their encoded return values (or why
    they failed) on result_fd. Everything used once the candidate has run is a local."""
    write, exit_now, exec_, type_, dict_ = os.write, os._exit, exec, type, dict
    as_str, exception_str, type_name = str.__str__, BaseException.__str__, type.__dict__["__name__"].__get__
    max_chars, dict_get, join = MAX_REASON_CHARS, dict.get, ", ".join
    pristine = dict(builtins.__dict__)
    encode = make_encoder()
    try:
        program, reason_all = compile(code, "<candidate>", "exec"), None
    except BaseException as e:  # reported as every test's failure
        program, reason_all = None, f"{type(e).__name__}: {e}"
    sys.addaudithook(hook)
    for index, calls in enumerate(tests):
        line = None
        if reason_all is None:
            try:
                namespace = {"__name__": "__main__", "__builtins__": pristine.copy()}
                exec_(program, namespace)
                values = []
                for name, args, keywords in calls:
                    function = dict_get(namespace, name)
                    if function is None:
                        raise NameError(f"name {name!r} is not defined")
                    values.append(encode(function(*args, **dict_(keywords))))
                line = f"{index} ok [{join(values)}]"
            except BaseException as e:
                try:
                    reason = as_str(f"{type_name(type_(e))}: {exception_str(e)}")
                except BaseException:
                    reason = "an exception that cannot be printed"
        else:
            reason = reason_all
        if line is None:
            line = f"{index} fail " + as_str(reason)[:max_chars].replace("\n", " ")
        write(result_fd, (line + "\n").encode("utf-8", "replace"))
    write(result_fd, b"done\n")
    exit_now(0)  # no atexit handler or finalizer of the candidate runs after the report


def run_program(code: str, hook) -> None:
    """A tool call: run the program once; its prints (stdout and stderr, both the parent's pipe) are the result.
    An exception ends it with its last line, as Python prints it, and exit status 1; a clean end is status 0."""
    exit_now, type_, type_name, str_ = os._exit, type, type.__dict__["__name__"].__get__, str
    stdout, stderr = sys.stdout, sys.stderr
    for stream in (stdout, stderr):
        stream.reconfigure(line_buffering=True)  # what was printed before a timeout still reaches the parent
    namespace = {"__name__": "__main__", "__builtins__": dict(builtins.__dict__)}
    sys.addaudithook(hook)
    status = 0
    try:
        exec(compile(code, "<tool>", "exec"), namespace)
    except SystemExit as e:
        status = 0 if e.code is None or e.code == 0 else 1
    except BaseException as e:
        status = 1
        try:
            stdout.flush()
            stderr.write(f"{type_name(type_(e))}: {str_(e)}\n")  # the program's own process: its __str__ may run
        except BaseException:
            pass
    try:
        stdout.flush()
        stderr.flush()
    except BaseException:
        pass
    exit_now(status)


def serve() -> None:
    """The fork server: reads its limits, then per request forks a child that runs one tool call, and answers with
    what it printed and how it ended. It runs no candidate code: every layer that is irreversible or would stop it
    forking (limits, uid drop, RLIMIT_NPROC, audit hook) is applied in the child."""
    import select  # an extension module, loaded by the server only: the one-shot child keeps to built-in ones

    request_fd = os.dup(0)
    response_fd = redirect_stdio()
    config = read_frame(request_fd)
    preload(config)
    base = os.getcwd()
    number = 0
    while config is not None and (request := read_frame(request_fd)) is not None:
        number += 1
        status, timed_out, output = serve_call(request, config, f"{base}/call-{number}", select)
        end_strays(config)
        header = b"R" + status.to_bytes(4, "big", signed=True) + bytes([timed_out]) + len(output).to_bytes(8, "big")
        view = memoryview(header + output)
        while view:
            view = view[os.write(response_fd, view):]


def end_strays(config: dict) -> None:
    """Under r1lab's own boundary, after a call: kill and reap every other process of the PID namespace (the host's
    root is exempt from RLIMIT_NPROC, so a call may have forked). Only as its first process: kill(-1) spares it."""
    if config["boundary"] != "landlock" or os.getpid() != 1:
        return
    try:
        os.kill(-1, SIGKILL)
    except ProcessLookupError:
        return  # nothing was left
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def read_frame(fd: int) -> dict | None:
    """One request (8-byte length, then a marshal'd dict) from the trusted parent; None at EOF."""
    head = read_exactly(fd, 8)
    return None if head is None else marshal.loads(read_exactly(fd, int.from_bytes(head, "big")) or b"")


def read_exactly(fd: int, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)



def preload(config: dict) -> None:
    """Import once, in the server, what every child's setup imports (ctypes and landlock too: each child removes
    them from sys.modules before its hook, and guard_extensions refuses the loaded _ctypes)."""
    for name in ("resource", "types", "ctypes"):
        __import__(name)
    import_builtins()
    if config["boundary"] == "landlock":
        sys.path.insert(0, config["landlock"]["package"])
        try:
            import landlock

            landlock.landlock_abi_version()  # cached: the children's rules ask for it
        finally:
            del sys.path[0]


def serve_call(request: dict, config: dict, workdir: str, select) -> tuple[int, bool, bytes]:
    """Fork a child for one call and collect it: (exit status as subprocess gives it, timed out, output)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            run_call(request["code"], config, workdir, write_end)
        finally:
            os._exit(70)  # setup failed: never fall back into the server's loop
    os.close(write_end)
    try:
        return collect(pid, read_end, request["timeout_s"], request["max_bytes"], select)
    finally:
        os.close(read_end)


def run_call(code: str, config: dict, workdir: str, out_fd: int) -> None:
    """In the forked child: main()'s setup, then the call. The uid drop before clearing the previous call's files
    (under bubblewrap they are nobody's), Landlock once the working directory exists, the hook last."""
    os.setsid()  # its own process group, which the server kills as a whole
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the server's request and response pipes among them
    limit_resources(config["cpu_s"], config["memory_mb"], config["file_mb"], config["open_files"])
    layers = confine(config)
    scratch = (workdir.rpartition("/")[0],) + (("/tmp", "/dev/shm") if config["boundary"] == "bwrap" else ())
    if not all(clear_directory(d) for d in scratch):
        os._exit(STALE_FILES_STATUS)  # never run with an earlier call's files in reach; the parent restarts us
    os.mkdir(workdir, 0o700)
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir  # tempfile writes inside the working directory
    layers += confine_filesystem(config, workdir)
    forget_setup_modules()
    disarm_unaudited()
    hook = make_hook(os.getcwd())
    os.write(1, f"layers {','.join(layers + ['audit'])}\n".encode())
    run_program(code, hook)


def clear_directory(path: str) -> bool:
    """Remove everything in path (an earlier call's files); False when something is left. Through directory fds,
    so that a deep tree is no path-length problem; past MAX_CLEAR_DEPTH it gives up (the server is replaced)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        empty_directory(fd, 0)
        return True
    except (OSError, RecursionError):
        return False
    finally:
        os.close(fd)


def empty_directory(fd: int, depth: int) -> None:
    if depth > MAX_CLEAR_DEPTH:
        raise OSError("too deep")
    for entry in list(os.scandir(fd)):
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.name, dir_fd=fd)
            continue
        os.chmod(entry.name, 0o700, dir_fd=fd)  # the call may have taken its own permissions away
        child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            empty_directory(child, depth + 1)
        finally:
            os.close(child)
        os.rmdir(entry.name, dir_fd=fd)


def collect(pid: int, read_fd: int, timeout_s: float, max_bytes: int, select) -> tuple[int, bool, bytes]:
    """Read the child's output until it has ended and closed it, max_bytes is passed or the deadline; then kill its
    group (whatever is left of it) and reap it."""
    deadline = time.monotonic() + timeout_s
    chunks, size, timed_out = [], 0, False
    pidfd = os.pidfd_open(pid)  # readable once the child has exited, even if it closed its output long before
    watching = {read_fd, pidfd}
    try:
        while watching:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready = select.select(list(watching), [], [], left)[0]
            if pidfd in ready:
                watching.discard(pidfd)
            if read_fd in ready:
                data = os.read(read_fd, 1 << 16)
                if not data:
                    watching.discard(read_fd)
                chunks.append(data)
                size += len(data)
                if size > max_bytes:
                    break
    finally:
        for kill in (os.killpg, os.kill):  # its group, and itself if it died before making one (unreaped: no reuse)
            try:
                kill(pid, SIGKILL)
            except OSError:
                pass
        os.close(pidfd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), timed_out, b"".join(chunks)


def main() -> None:
    if sys.argv[1:] == [SERVER_FLAG]:
        serve()
        return
    payload = read_payload()
    result_fd = redirect_stdio()
    program = payload.get("program", False)
    if program:  # a tool call: the program's own output is the result, on the parent's pipe
        os.dup2(result_fd, 1)
        os.dup2(result_fd, 2)
    limit_resources(payload["cpu_s"], payload["memory_mb"], payload["file_mb"], payload["open_files"])
    layers = confine(payload) + confine_filesystem(payload, os.getcwd())
    forget_setup_modules()
    if os.getpid() == 1:
        exit_on_cpu_limit()
    disarm_unaudited()
    hook = make_hook(os.getcwd())
    os.write(result_fd, f"layers {','.join(layers + ['audit'])}\n".encode())
    if program:
        run_program(payload["code"], hook)
    run(payload["code"], payload["tests"], result_fd, hook)


if __name__ == "__main__":
    main()
