"""Machines for the cluster-launch test, built on this one: network namespaces on a bridge.

Each host is as separate as a real machine where it matters to Ray and the launcher:

- its own network stack: a veth pair onto a bridge, an address in 198.51.100.0/24 (TEST-NET-2,
  a documentation range), a default route (so Ray finds its address the way it does on a real
  machine), an ``/etc/hosts`` naming every host and no DNS server;
- its own PID namespace with ``sshd`` as PID 1, so ``ray stop`` on one host sees only that host's
  processes, and killing PID 1 ends everything that ran there;
- its own mount and UTS namespace: a private ``/root`` (home: ``~/.ray``, ``~/clipray``, the
  Python environment), ``/tmp`` (``/tmp/ray``), ``/run``, ``/dev/shm`` and hostname.
  ``/mnt/clipray`` on every host is one shared directory, standing in for an NFS mount.

What a host has before ``ray up`` touches it is its "machine image": sshd (Debian's
openssh-server, with rsync for the launcher's file mounts, installed here when missing), the test's
public key, and ``/root/venv``: a Python with clipray's dependencies preinstalled (this checkout's
``.venv`` site-packages, read-only, through a ``.pth`` file; clipray itself is not importable
until ``ray up``'s setup commands install it from the copy they rsync to ``~/clipray``). pip on a
host reads this machine's offline package mirror: the hosts have no internet.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "198.51.100"  # TEST-NET-2 (RFC 5737): never routed, never anyone's real address
GATEWAY = f"{SUBNET}.1"  # the bridge: where the launcher (this machine) sits
SHARED = "/mnt/clipray"  # the shared directory's path on every host
IMAGE_PACKAGES = ("openssh-server", "rsync")  # Debian packages the hosts need
CHECKOUT_SITE = Path(sysconfig.get_paths()["purelib"])  # this checkout's .venv site-packages
IMAGE_SITE = Path("/root/.image-site")  # where a host sees them (its /root and /tmp are private)
PIP_MIRROR = (  # this machine's offline PyPI mirror (the hosts cannot reach pypi.org)
    "[global]\nindex-url = file:///opt/pypi/simple\n"
    "extra-index-url = file:///opt/pypi-more/simple\nfind-links = /opt/wheels\n"
)


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command of this machine (root) and return what it printed."""
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def install_image_packages() -> None:
    """sshd and rsync from Debian, when missing (CI machines are fresh Debian images)."""
    if shutil.which("sshd") or Path("/usr/sbin/sshd").exists():
        if shutil.which("rsync"):
            return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *IMAGE_PACKAGES]):
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)


def ssh_keypair(directory: Path) -> Path:
    """A fresh ed25519 key pair (no passphrase); returns the private key's path."""
    key = directory / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clipray-test", "-f", str(key))
    return key


@dataclass
class Host:
    """One namespace host: ``name`` is its hostname, ``ip`` its address on the bridge."""

    name: str
    ip: str
    netns: str
    veth: str  # the bridge end of its veth pair
    root: Path  # its private directories, as this machine sees them
    proc: subprocess.Popen | None = None  # ``unshare``, whose child is the host's PID 1
    pidns: str = ""  # the PID namespace's identity (``pid:[inode]``)

    @property
    def pid1(self) -> int:
        """The host's PID 1 (sshd) as this machine numbers it."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def run(self, command: str, timeout: float = 60, check: bool = False):
        """``command`` (bash) inside the host: its PID, mount, UTS and network namespaces."""
        argv = ["nsenter", "-t", str(self.pid1), "-p", "-m", "-u", "-n", "--", "bash", "-c"]
        return sh(*argv, command, check=check, timeout=timeout)

    def processes(self) -> list[str]:
        """Every process of the host but its sshd: ``pid command line``."""
        out = self.run("ps -ww -eo pid=,args= | awk '$1 != 1'").stdout
        return [line.strip() for line in out.splitlines() if "ps -eo" not in line and line]


class Hosts:
    """``count`` hosts named ``names`` on one bridge; :meth:`close` removes every trace of them.

    Every name this class creates (bridge, veths, network namespaces) starts with ``prefix``,
    so a leftover is easy to find and one run never touches another run's hosts."""

    def __init__(self, base: Path, names: list[str], key: Path, prefix: str = "clr"):
        self.base, self.key, self.prefix = base, key, prefix
        self.bridge = f"{prefix}-br"
        self.shared = base / "shared"
        self.hosts = [
            Host(n, f"{SUBNET}.{11 + i}", f"{prefix}-{n}", f"{prefix}-v{i}", base / "hosts" / n)
            for i, n in enumerate(names)
        ]

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # ------------------------------------------------------------------------------ building
    def start(self) -> Hosts:
        """Bridge, then each host's image, network and namespaces; waits for every sshd."""
        self.shared.mkdir(parents=True, exist_ok=True)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            self._image(host)
            self._network(host)
            self._boot(host)
        for host in self.hosts:
            self._wait_for_sshd(host)
        return self

    def _image(self, host: Host) -> None:
        """The host's private directories and what its "machine image" holds."""
        home = host.root / "root"
        for sub in (".ssh", ".sshd", ".pyenv", ".config/pip", IMAGE_SITE.name):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (host.root / "tmp").mkdir(mode=0o1777, exist_ok=True)
        os.chmod(home, 0o700)
        shutil.copy(f"{self.key}.pub", home / ".ssh" / "authorized_keys")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".sshd" / "host_key"))
        (home / ".sshd" / "sshd_config").write_text(_sshd_config(host.ip))
        (home / ".config" / "pip" / "pip.conf").write_text(PIP_MIRROR)
        (home / ".bashrc").write_text("export PATH=/root/venv/bin:$PATH\n")
        (home / ".profile").write_text('[ -n "$BASH" ] && [ -f ~/.bashrc ] && . ~/.bashrc\n')
        names = "".join(f"{h.ip} {h.name}\n" for h in self.hosts)
        (host.root / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
        (host.root / "resolv.conf").write_text("# no DNS server on the test's hosts\n")
        _python_environment(home / "venv")

    def _network(self, host: Host) -> None:
        """A veth pair: one end on the bridge, the other the host's eth0 with its address."""
        sh("ip", "netns", "add", host.netns)
        sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}p")
        sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
        sh("ip", "link", "set", f"{host.veth}p", "netns", host.netns)
        inside = ["ip", "netns", "exec", host.netns, "ip"]
        sh(*inside, "link", "set", f"{host.veth}p", "name", "eth0")
        sh(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        sh(*inside, "link", "set", "eth0", "up")
        sh(*inside, "link", "set", "lo", "up")
        sh(*inside, "route", "add", "default", "via", GATEWAY)

    def _boot(self, host: Host) -> None:
        """New PID, mount and UTS namespaces in the host's network namespace; sshd is PID 1."""
        r = host.root
        boot = f"""set -e
hostname {host.name}
if [ -d /root/.pyenv ]; then mount --rbind /root/.pyenv {r}/root/.pyenv; fi
mount --bind {CHECKOUT_SITE} {r}/root/{IMAGE_SITE.name}
mount --rbind {r}/root /root
mount -t tmpfs -o size=64m,mode=755 tmpfs /run && mkdir -p /run/sshd
mount -t tmpfs -o size=8g tmpfs /dev/shm
mount --bind {r}/hosts /etc/hosts
mount --bind {r}/resolv.conf /etc/resolv.conf
mount -t tmpfs -o size=1m tmpfs /mnt && mkdir {SHARED} && mount --bind {self.shared} {SHARED}
mount --bind {r}/tmp /tmp
exec /usr/sbin/sshd -D -e -f /root/.sshd/sshd_config"""
        log = open(r / "sshd.log", "ab")
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--mount", "--uts",
             "--fork", "--kill-child", "--mount-proc", "bash", "-c", boot],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()

    def _wait_for_sshd(self, host: Host, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while True:
            if self.ssh(host, "true", check=False, timeout=10).returncode == 0:
                host.pidns = os.readlink(f"/proc/{host.pid1}/ns/pid")
                return
            if time.time() > deadline or (host.proc and host.proc.poll() is not None):
                log = (host.root / "sshd.log").read_text()[-2000:]
                raise RuntimeError(f"host {host.name}: sshd did not come up: {log}")
            time.sleep(0.3)

    def ssh(self, host: Host, command: str, check: bool = True, timeout: float = 60):
        """``command`` on ``host`` over SSH as root, with the test's key (as the launcher does)."""
        return sh(*self.ssh_argv(host), command, check=check, timeout=timeout)

    def ssh_argv(self, host: Host, *options: str) -> list[str]:
        return [
            "ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=5", *options, f"root@{host.ip}",
        ]  # fmt: skip

    # ------------------------------------------------------------------------------ removing
    def close(self) -> None:
        """Kill every host (its PID 1: the kernel ends the whole PID namespace), then remove
        the network namespaces, veths and the bridge. Safe to call twice or half-built."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                os.killpg(host.proc.pid, signal.SIGKILL)
                host.proc.wait(timeout=30)
        deadline = time.time() + 30  # the kernel ends a PID namespace's processes in a moment
        while time.time() < deadline and any(w.startswith("process") for w in self.leftovers()):
            time.sleep(0.2)
        for host in self.hosts:
            sh("ip", "netns", "del", host.netns, check=False)
            sh("ip", "link", "del", host.veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """What of these hosts still exists: processes of their PID namespaces, network
        namespaces, links (the bridge, veths)."""
        found = []
        spaces = {h.pidns for h in self.hosts if h.pidns}
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "ns" / "pid") in spaces:
                    found.append(f"process {proc.name}: {(proc / 'cmdline').read_bytes()[:80]!r}")
            except OSError:  # gone meanwhile
                continue
        netns = sh("ip", "netns", "list").stdout.split()
        found += [f"netns {n}" for n in netns if n.startswith(f"{self.prefix}-")]
        links = sh("ip", "-o", "link", "show").stdout
        found += [f"link {w}" for w in links.split() if w.startswith(f"{self.prefix}-")]
        return found


def _sshd_config(ip: str) -> str:
    return f"""ListenAddress {ip}
HostKey /root/.sshd/host_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile /root/.ssh/authorized_keys
PrintMotd no
AcceptEnv LANG
Subsystem sftp internal-sftp
"""


def _python_environment(venv: Path) -> None:
    """``venv``: this machine's Python with this checkout's dependencies (not clipray) and
    their commands (ray, mlflow, ...) pointing at the host's own interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # The checkout may live under /tmp or /root, which are private on a host: its site-packages
    # are bind-mounted at IMAGE_SITE in the host's home (see _boot), and read from there.
    (venv / "lib" / version / "site-packages" / "_image.pth").write_text(f"{IMAGE_SITE}\n")
    here = Path(sys.executable).parent
    for script in here.iterdir():
        if not script.is_file():  # e.g. __pycache__ of a .py script a package installs
            continue
        text = script.read_bytes()
        if script.name == "clipray" or not text.startswith(f"#!{here}/python".encode()):
            continue
        body = text.split(b"\n", 1)[1]
        target = venv / "bin" / script.name
        target.write_bytes(b"#!/root/venv/bin/python\n" + body)
        target.chmod(0o755)
