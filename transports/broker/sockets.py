"""The broker's socket: its private directory (:func:`prepare_socket_dir`) and whether
a broker accepts on a path (:func:`_socket_accepts`)."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


def prepare_socket_dir(folder: Path) -> None:
    """Create ``folder`` 0700 if missing; refuse one that other users can enter."""
    folder = Path(folder)
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{folder} is not a directory")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{folder} is owned by uid {st.st_uid}, not by this user "
                         f"({os.geteuid()}); put the socket in a directory you own")
    if st.st_mode & 0o077:
        raise ValueError(
            f"{folder} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); put the "
            "socket in a private directory (it is created 0700 when missing), e.g. "
            f"unix://{Path(tempfile_dir()) / 'celery-bench-unix' / 'broker.sock'}")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def _socket_accepts(path: str, timeout: float = 0.5) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()
