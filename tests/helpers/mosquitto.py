"""A real mosquitto broker for tests, started and stopped by the test on a free port."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None,
                 tls_user: tuple[str, str] | None = None) -> None:
        """A broker; with tls_user=(user, password) it takes only TLS and that login."""
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        # persistence on: the broker keeps persistent sessions across its own restarts
        # `user root`: as root mosquitto would switch to its own user, who cannot read the
        # test's private temp dirs
        conf = (f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\npersistence true\n"
                f"persistence_location {workdir}/\nlog_dest file {workdir}/mosquitto.log\n")
        if tls_user:
            self._make_certs()
            pw = workdir / "passwd"
            subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), *tls_user], check=True,
                           capture_output=True)
            conf += (f"allow_anonymous false\npassword_file {pw}\ncafile {self.ca}\n"
                     f"certfile {workdir}/server.pem\nkeyfile {workdir}/server.key\n")
        else:
            conf += "allow_anonymous true\n"
        self.conf.write_text(conf)

    def _make_certs(self) -> None:
        """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
        d = self.workdir
        self.ca = d / "ca.pem"

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=lantern-test-ca", "-keyout", str(d / "ca.key"), "-out", str(self.ca))
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(self.ca), "-CAkey",
            str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"),
            "-out", str(d / "server.pem"))

    def start(self) -> None:
        assert Path(MOSQUITTO).exists(), "mosquitto missing: `make test` installs it"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
