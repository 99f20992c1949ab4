"""Functions run in forked children, their results read back through a pipe."""
import json
import os


def fork(function, *args):
    """Run function(*args) in a child; its return value (JSON) comes back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # pragma: no cover - child
        code = 0
        try:                                     # (never out of here: it would run pytest on)
            os.close(read_end)
            result = function(*args)
            os.write(write_end, json.dumps(result).encode())
        except BaseException as exc:             # noqa: BLE001 - reported to the parent
            os.write(write_end, json.dumps({'error': repr(exc)}).encode())
            code = 1
        finally:
            try:
                os.close(write_end)
            finally:
                os._exit(code)
    os.close(write_end)
    return pid, read_end


def collect(pid, read_end, timeout=120):
    chunks = []
    while True:
        data = os.read(read_end, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(read_end)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:                    # already reaped by the caller
        pass
    return json.loads(b''.join(chunks) or b'null')
