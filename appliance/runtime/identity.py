"""Who the servers run as.

As root, every server (Postgres, Redis, API, workers) runs as the system user `settings.service_user`
(created when missing); as anyone else, as the current user. Nothing the appliance starts runs as root.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class IdentityError(Exception):
    pass


@dataclass(frozen=True)
class ServiceIdentity:
    user: str
    uid: int
    gid: int
    drop: bool  # True when we are root and start children as `user`

    @property
    def group(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `subprocess.Popen` that start a child as this identity."""
        if self.drop:
            # extra_groups=[]: the child keeps only the service group, not root's supplementary groups.
            return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": 0o077}
        return {"umask": 0o077}

    def chown(self, path: Path) -> None:
        if self.drop:
            st = path.lstat()
            if (st.st_uid, st.st_gid) != (self.uid, self.gid):
                os.lchown(path, self.uid, self.gid)

    def chown_tree(self, root: Path) -> None:
        if not self.drop:
            return
        self.chown(root)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), self.uid, self.gid)

    def _allowed(self, st: os.stat_result, bits: int) -> bool:
        """Whether this identity (with only its primary group) has `bits` (r=4, w=2, x=1) on a file."""
        if self.uid == 0:
            return True
        mode = st.st_mode
        if st.st_uid == self.uid:
            return (mode >> 6) & bits == bits
        if st.st_gid == self.gid:
            return (mode >> 3) & bits == bits
        return mode & bits == bits

    def blocking_dir(self, path: Path) -> tuple[Path, os.stat_result] | None:
        """The first existing directory on the way to `path` (inclusive) this identity cannot enter."""
        path = Path(os.path.abspath(path))
        chain = [*reversed(path.parents), path]
        for p in chain:
            try:
                st = p.stat()
            except FileNotFoundError:
                return None  # what does not exist yet will be created by us, traversable
            if stat.S_ISDIR(st.st_mode) and not self._allowed(st, 1):
                return p, st
        return None

    def can_read_exec(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return self._allowed(st, 5) and self.blocking_dir(path.parent) is None


def describe_blocker(p: Path, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner})"


def ensure_service_user(name: str) -> pwd.struct_passwd:
    """Return the system user `name`, creating it (and its group) when missing. Root only."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise IdentityError(f"cannot create the service user {name!r}: useradd not found") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise IdentityError(f"cannot create the service user {name!r}: {msg[-1] if msg else res.returncode}")
    return pwd.getpwnam(name)


def resolve_identity(service_user: str, create: bool = True) -> ServiceIdentity:
    """The identity servers run as: `service_user` when we are root, else the current user."""
    if os.geteuid() != 0:
        ent = pwd.getpwuid(os.geteuid())
        return ServiceIdentity(user=ent.pw_name, uid=ent.pw_uid, gid=os.getegid(), drop=False)
    if service_user == "root" or not service_user:
        raise IdentityError("servers never run as root: set APPLIANCE_SERVICE_USER to an unprivileged user")
    if create:
        ent = ensure_service_user(service_user)
    else:
        try:
            ent = pwd.getpwnam(service_user)
        except KeyError:
            raise IdentityError(f"the service user {service_user!r} does not exist") from None
    if ent.pw_uid == 0:
        raise IdentityError(f"the service user {service_user!r} has uid 0; servers never run as root")
    return ServiceIdentity(user=ent.pw_name, uid=ent.pw_uid, gid=ent.pw_gid, drop=True)
