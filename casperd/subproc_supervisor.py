"""The supervisor of confined commands (see :mod:`casperd.subproc`), as the source of a script.

It runs as ``python -I -S -c SUPERVISOR_SCRIPT CONFIG`` with the daemon's identity, and so that it
starts in a few milliseconds it imports only the standard library's smallest modules. CONFIG is
JSON: ``argv``, ``lifeline`` (fd to read: EOF means kill everything now), ``status`` (fd to write
``exit N`` / ``signal N`` to), ``limits`` (``cpu``, ``as``, ``nproc``, ``fsize``) and ``uid``/``gid``.

Steps: become a child subreaper; fork the command, which in the child makes a new session, sets
its resource limits, drops ambient capabilities, sets no-new-privileges, switches to uid/gid with
no supplementary groups and execs; wait for the command's exit or the lifeline's EOF; then kill
every descendant, by parent (orphans are re-parented to the subreaper) and by session id, until
none is left; report the status; exit.
"""

SUPERVISOR_SCRIPT = r"""
# warnings: execvp imports it, and after the uid switch the standard library may be out of reach
import ctypes, json, os, resource, select, signal, sys, time, warnings
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT = 38, 36, 47
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
life, status = cfg["lifeline"], cfg["status"]
argv, lim, uid, gid = cfg["argv"], cfg["limits"], cfg["uid"], cfg["gid"]
RL = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
      "fsize": resource.RLIMIT_FSIZE}
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

def child():
    try:
        os.close(life); os.close(status)
        os.setsid()
        for name, value in lim.items():
            if value is not None:
                soft, hard = resource.getrlimit(RL[name])
                value = int(value)
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                resource.setrlimit(RL[name], (value, value))
        libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
        if gid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "no_new_privs")
        os.execvp(argv[0], argv)
    except OSError as exc:
        what = exc.filename or argv[0]
        os.write(2, f"casper: cannot start {what}: {exc.strerror or exc}\n".encode())
        os._exit(127)
    except BaseException as exc:
        os.write(2, f"casper: cannot start {argv[0]}: {exc}\n".encode())
        os._exit(127)

pid = os.fork()
if pid == 0:
    child()
os.close(0)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1); os.dup2(devnull, 2)  # only the command writes the call's output

def stat_of(p):
    try:
        with open(f"/proc/{p}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[3])  # ppid, session

def victims(me, sid):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = int(name)
            st = stat_of(p)
            if st and p != me and (st[0] == me or st[1] == sid):
                out.append(p)
    return out

def sweep(me, sid, main_status):
    for rnd in range(2000):
        found = victims(me, sid)
        if not found:
            return main_status
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                p, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if p == 0:
                break
            if p == pid and main_status is None:
                main_status = st
        time.sleep(0.001 if rnd < 20 else 0.01)
    return main_status

me = os.getpid()
main_status = None
aborted = False
try:
    pidfd = os.pidfd_open(pid)
except (AttributeError, OSError):
    pidfd = None
while main_status is None:
    watch = [life] + ([pidfd] if pidfd is not None else [])
    r, _, _ = select.select(watch, [], [], None if pidfd is not None else 0.02)
    if life in r and not os.read(life, 1):
        aborted = True
        break
    p, st = os.waitpid(pid, os.WNOHANG)
    if p == pid:
        main_status = st
main_status = sweep(me, pid, main_status)
if main_status is None:
    msg = "signal 9"
elif os.WIFSIGNALED(main_status):
    msg = f"signal {os.WTERMSIG(main_status)}"
else:
    msg = f"exit {os.WEXITSTATUS(main_status)}"
if aborted:
    msg = "aborted " + msg
os.write(status, msg.encode())
os._exit(0)
"""
