"""age encryption in a child process, fed (or read) through a pipe.

`pyrage` holds the GIL while it encrypts, so in one process reading blobs, hashing them for the
manifest and encrypting run one after the other. In a child, age takes one core while the parent
reads, frames and hashes on another: measured by bench/backup.py, see docs/backup.md.

    python -m appliance.backup.agepipe encrypt RECIPIENT OUT     # stdin (tar) -> OUT (age), fsynced
    python -m appliance.backup.agepipe decrypt IDENTITY_FILE IN  # IN (age) -> stdout (tar)

The child gets the public recipient, or the *path* of the identity file (never a secret on its
command line). A failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys


def _identity(path: str):  # type: ignore[no-untyped-def]
    from pyrage import x25519

    with open(path) as fh:
        keys = [ln.strip() for ln in fh if ln.strip().startswith("AGE-SECRET-KEY-")]
    return x25519.Identity.from_str(keys[0])


def main(argv: list[str]) -> int:
    import pyrage
    from pyrage import x25519

    try:
        if argv[:1] == ["encrypt"] and len(argv) == 3:
            recipient = x25519.Recipient.from_str(argv[1])
            fd = os.open(argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                pyrage.encrypt_io(sys.stdin.buffer, out, [recipient])
                out.flush()
                os.fsync(out.fileno())
            return 0
        if argv[:1] == ["decrypt"] and len(argv) == 3:
            with open(argv[2], "rb", buffering=1 << 20) as src:
                pyrage.decrypt_io(src, sys.stdout.buffer, [_identity(argv[1])])
            sys.stdout.buffer.flush()
            return 0
    except BrokenPipeError:
        return 3  # the parent stopped reading (it found a problem and says which)
    except Exception as exc:  # noqa: BLE001 - one line for the parent
        sys.stderr.write(f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}\n")
        return 2
    sys.stderr.write("usage: agepipe encrypt RECIPIENT OUT | decrypt IDENTITY_FILE IN\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
