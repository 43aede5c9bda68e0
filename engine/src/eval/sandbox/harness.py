# The test harness of the code sandbox (see verdict.rs for the threat model).
#
# Run as `python3 -B -s -c <this> VERDICT_FD PAYLOAD_FD`. Two processes:
#
# - the solution process, forked first, before anything secret is read: it closes every
#   descriptor but its two pipe ends, receives the solution's source, runs it, and answers
#   calls of the entry point, one at a time, values as tagged JSON;
# - this process, the judge: it reads the tests from PAYLOAD_FD, runs them with `candidate`
#   bound to a proxy that calls into the solution process, and writes the verdict to
#   VERDICT_FD. The completion never runs here, and the solution process holds no
#   descriptor of the verdict pipe, the payload, or this process's memory.
import sys

# `-c` puts the working directory first on the module path, and the solution can write
# there: take it off before anything is imported, so a planted `json.py` is never loaded.
sys.path[:] = [entry for entry in sys.path if entry not in ("", ".")]

import builtins
import json
import os
import struct
import traceback

MESSAGE_LIMIT = 16 << 20


def send(fd, message):
    data = json.dumps(message).encode()
    data = struct.pack(">Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def read_exactly(fd, count):
    chunks = []
    while count:
        chunk = os.read(fd, min(count, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    header = read_exactly(fd, 8)
    if header is None:
        return None
    (length,) = struct.unpack(">Q", header)
    if length > MESSAGE_LIMIT:
        raise ValueError("message of %d bytes is over the limit" % length)
    data = read_exactly(fd, length)
    if data is None:
        return None
    return json.loads(data)


# Values cross between the processes as JSON with tagged containers, so the judge only ever
# builds plain built-in objects (no pickle, no eval, no object of the solution's classes).
SCALARS = (type(None), bool, int, float, str)


def encode(value):
    kind = type(value)
    if kind in SCALARS:
        return value
    if kind is list:
        return {"list": [encode(item) for item in value]}
    if kind is tuple:
        return {"tuple": [encode(item) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is set:
        return {"set": [encode(item) for item in value]}
    if kind is frozenset:
        return {"frozenset": [encode(item) for item in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError("a value of type %s cannot cross the sandbox" % kind.__name__)


def decode(value):
    if type(value) in SCALARS:
        return value
    if type(value) is not dict or len(value) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = value.items()
    if tag == "list":
        return [decode(item) for item in body]
    if tag == "tuple":
        return tuple(decode(item) for item in body)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in body}
    if tag == "set":
        return {decode(item) for item in body}
    if tag == "frozenset":
        return frozenset(decode(item) for item in body)
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag == "complex":
        return complex(float(body[0]), float(body[1]))
    raise ValueError("unknown tag %r" % tag)


def solution_process(keep_read, keep_write):
    # Drop every descriptor but stdio and our two pipe ends (the verdict pipe and the payload
    # above all) before running anything foreign.
    low, high = sorted((keep_read, keep_write))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 30)
    message = receive(keep_read)
    if message is None:
        os._exit(0)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(message["solution"], "solution.py", "exec"), namespace)
        function = namespace[message["entry_point"]]
    except Exception:
        traceback.print_exc()
        send(keep_write, {"loaded": False, "error": traceback.format_exc(limit=-3)})
        os._exit(1)
    send(keep_write, {"loaded": True})
    while True:
        request = receive(keep_read)
        if request is None:
            os._exit(0)
        try:
            args, kwargs = decode(request["args"]), decode(request["kwargs"])
            reply = {"value": encode(function(*args, **kwargs))}
        except Exception as error:
            reply = {"raised": type(error).__name__, "message": str(error)[:2000]}
        send(keep_write, reply)


class SolutionError(Exception):
    """The solution process failed outside an ordinary exception of the entry point."""


def make_undumpable():
    # PR_SET_DUMPABLE 0: processes of our uid can no longer open /proc/<judge>/{mem,fd,environ}
    # nor ptrace us. Best effort: Landlock and seccomp already deny both.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


def main():
    verdict_fd, payload_fd = int(sys.argv[1]), int(sys.argv[2])
    to_solution_read, to_solution_write = os.pipe()
    from_solution_read, from_solution_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(to_solution_write)
            os.close(from_solution_read)
            solution_process(to_solution_read, from_solution_write)
        finally:
            os._exit(1)
    os.close(to_solution_read)
    os.close(from_solution_write)
    make_undumpable()

    with os.fdopen(payload_fd, "rb") as payload_file:
        payload = json.loads(payload_file.read())

    def finish(passed, error):
        verdict = {"passed": passed, "error": error[-2000:] if error else None}
        data = json.dumps(verdict).encode()
        while data:
            data = data[os.write(verdict_fd, data):]
        os.close(verdict_fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except OSError:
            pass
        if error:
            try:
                sys.stderr.write(error + "\n")
                sys.stderr.flush()
            except Exception:
                pass
        os._exit(0 if passed else 1)

    try:
        send(to_solution_write, {"solution": payload["solution"], "entry_point": payload["entry_point"]})
        loaded = receive(from_solution_read)
    except Exception:
        finish(False, "the solution process could not be reached: " + traceback.format_exc(limit=-1))
    if loaded is None:
        finish(False, "the solution process ended while loading the solution")
    if not loaded.get("loaded"):
        finish(False, "the solution failed to load: " + str(loaded.get("error")))

    def candidate(*args, **kwargs):
        send(to_solution_write, {"args": encode(list(args)), "kwargs": encode(kwargs)})
        reply = receive(from_solution_read)
        if reply is None:
            raise SolutionError("the solution process ended during a call")
        if "value" in reply:
            return decode(reply["value"])
        raised = getattr(builtins, str(reply.get("raised")), None)
        message = str(reply.get("message"))
        if isinstance(raised, type) and issubclass(raised, Exception):
            raise raised(message)
        raise SolutionError("%s: %s" % (reply.get("raised"), message))

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        helpers = payload["helpers"]
        for source in (helpers, helpers + "\n    pass\n"):
            try:
                exec(compile(source, "prompt.py", "exec"), namespace)
                break
            except SyntaxError:
                continue
        exec(compile(payload["tests"], "tests.py", "exec"), namespace)
        namespace[payload["entry_point"]] = candidate
        namespace["check"](candidate)
    except BaseException:
        finish(False, traceback.format_exc(limit=-4))
    finish(True, None)


main()
