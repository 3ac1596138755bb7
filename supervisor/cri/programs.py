"""Program descriptions for CRI containers.

A container's description comes from its pod's annotation
``capvisor.dev/program.<container-name>`` (YAML, docs/descriptions.md) or,
without one, is synthesized from the container's ``command``, ``args``,
``envs``, ``working_dir`` and ``mounts``. Either way the CRI request fixes
what a pod author must not choose:

- ``program`` is the container's image (an executable in the image store);
- ``name`` is ``NAMESPACE/POD/CONTAINER``; ``!server`` handles carry it as
  the identity label ``program``, with ``namespace``, ``pod`` and
  ``container`` (the program cannot override them);
- ``policy`` comes from the security context's seccomp profile
  (:func:`seccomp_policy`);
- ``cwd`` is ``working_dir``, which must lie inside a mount (it is
  translated to the host path);
- the stop signal is the container's ``stop_signal`` unless the annotation
  has a ``stop:`` of its own.

CRI mounts of directories are the only file-system capabilities: ``!mount
<container_path>`` names one, read-only unless the mount is writable. So an
annotation may not use ``!file``, ``!mount {path: …}``, ``!fd`` or unix
socket paths, nor the keys ``name``, ``program``, ``policy``, ``runtime``,
``cwd``, ``log``, ``restart`` and ``degrade``. Problems are reported with the
annotation's line and column (the file name is ``pod annotation KEY``).

Pure: nothing here opens a file but :func:`directory_mounts`, which checks
the mounts' host paths exist, and :func:`seccomp_policy`, which checks a
Localhost profile is there.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cri_api.v1 import api_pb2
from ruamel.yaml.comments import CommentedMap

from .. import tags
from ..description import Description, parse_description
from ..errors import DescriptionError, Location, Problem
from ..resolve import HostMount
from ..yamlsrc import Source, load_yaml
from .status import invalid

ANNOTATION_PREFIX = "capvisor.dev/program."
#: Keys the CRI request decides; an annotation may not set them.
REFUSED_KEYS = {
    "name": "the name is the pod's identity, NAMESPACE/POD/CONTAINER",
    "program": "the program is the container's image",
    "policy": "the seccomp policy comes from the security context's seccompProfile",
    "runtime": "a CRI container reads only its image and its mounts",
    "cwd": "the working directory is the container's working_dir",
    "log": "the log is at the CRI's log_directory/log_path",
    "restart": "the kubelet restarts containers (restartPolicy of the pod)",
    "degrade": "confinement cannot be weakened from a pod annotation",
}
_FIELD = "CreateContainerRequest.config"


def cri_context(mounts: Mapping[str, HostMount]) -> tags.Context:
    """Where a CRI description stands: no ``!fd``; ``!mount NAME`` names ``mounts``."""
    return tags.Context(allow_fd=False, mounts=mounts)


_FD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class Program:
    """A container's checked description and what the backend needs with it.

    ``text`` is the YAML the backend is given (the annotation with the keys
    of the request appended, or the synthesized description), ``filename``
    names it in errors, ``mounts`` are the directory mounts by container
    path (what ``!mount NAME`` may name). ``description`` is the checked
    annotation; None for a synthesized description, which is made of
    checked request fields only (the backend parses it anyway).
    """

    text: str
    filename: str
    description: Description | None
    mounts: Mapping[str, HostMount]


def stop_signal(value: int) -> int | None:
    """The signal number of a CRI ``Signal`` enum value; None for RUNTIME_DEFAULT."""
    name = api_pb2.Signal.Name(value)
    if name == "RUNTIME_DEFAULT":
        return None
    if name.startswith("SIGRTMINPLUS"):
        return signal.SIGRTMIN + int(name.removeprefix("SIGRTMINPLUS"))
    if name.startswith("SIGRTMAXMINUS"):
        return signal.SIGRTMAX - int(name.removeprefix("SIGRTMAXMINUS"))
    aliases = {"SIGCLD": "SIGCHLD", "SIGPOLL": "SIGIO", "SIGIOT": "SIGABRT"}
    return int(signal.Signals[aliases.get(name, name)])


def seccomp_policy(
    context: api_pb2.LinuxContainerSecurityContext,
    *,
    allow_unconfined: bool,
    unconfined_policy: str,
) -> str:
    """The policy (a name or an absolute path) the security context asks for.

    RuntimeDefault (and no profile at all) is our ``default`` policy;
    Localhost is the file ``localhost_ref`` (absolute); Unconfined is
    refused unless ``allow_unconfined``, then it is ``unconfined_policy``.
    The deprecated ``seccomp_profile_path`` is honoured when ``seccomp`` is
    unset. Raises InvalidArgument naming the field.
    """
    field = f"{_FIELD}.linux.security_context.seccomp"
    if context.HasField("seccomp"):
        profile = context.seccomp
        kind = api_pb2.SecurityProfile.ProfileType.Name(profile.profile_type)
        ref = profile.localhost_ref
    else:
        path = context.seccomp_profile_path
        field = f"{_FIELD}.linux.security_context.seccomp_profile_path"
        if path in ("", "runtime/default", "docker/default"):
            kind, ref = "RuntimeDefault", ""
        elif path == "unconfined":
            kind, ref = "Unconfined", ""
        elif path.startswith("localhost/"):
            kind, ref = "Localhost", path.removeprefix("localhost/")
        else:
            raise invalid(field, f"unknown seccomp profile {path!r}")
    if kind == "RuntimeDefault":
        return "default"
    if kind == "Unconfined":
        if not allow_unconfined:
            raise invalid(
                field,
                "Unconfined is refused: this capvisor was started without --allow-unconfined "
                "(use RuntimeDefault or a Localhost profile)",
            )
        return unconfined_policy
    if not ref.startswith("/"):
        raise invalid(field, f"a Localhost profile is an absolute path, not {ref!r}")
    if not os.path.isfile(ref):
        raise invalid(field, f"Localhost profile {ref}: no such file")
    return ref


def directory_mounts(config: api_pb2.ContainerConfig) -> dict[str, HostMount]:
    """The container's directory mounts by container path (file mounts are left out)."""
    mounts: dict[str, HostMount] = {}
    for i, mount in enumerate(config.mounts):
        where = f"{_FIELD}.mounts[{i}]"
        if not mount.container_path.startswith("/"):
            raise invalid(f"{where}.container_path", "must be an absolute path")
        if not mount.host_path.startswith("/"):
            raise invalid(f"{where}.host_path", "must be an absolute path")
        try:
            is_dir = os.path.isdir(mount.host_path)
            exists = is_dir or os.path.exists(mount.host_path)
        except OSError as exc:
            raise invalid(f"{where}.host_path", f"{mount.host_path}: {exc.strerror}") from exc
        if not exists:
            raise invalid(f"{where}.host_path", f"{mount.host_path}: no such file or directory")
        if is_dir:
            mounts[os.path.normpath(mount.container_path)] = HostMount(
                mount.host_path, read_only=mount.readonly
            )
    return mounts


def host_cwd(working_dir: str, mounts: Mapping[str, HostMount]) -> str:
    """``working_dir`` translated to the host: inside a mount, or ``/``."""
    if working_dir in ("", "/"):
        return "/"
    path = os.path.normpath(working_dir)
    for container_path in sorted(mounts, key=len, reverse=True):
        if path == container_path or path.startswith(container_path.rstrip("/") + "/"):
            rest = os.path.relpath(path, container_path)
            return os.path.normpath(os.path.join(mounts[container_path].host_path, rest))
    raise invalid(f"{_FIELD}.working_dir", f"{working_dir} is not inside any mount")


def fd_name(container_path: str, taken: set[str]) -> str:
    """An fd name for a mount: its container path with ``/`` as ``-`` (unique)."""
    base = _FD_NAME_CHARS.sub("_", container_path.strip("/").replace("/", "-"))[:240] or "root"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    taken.add(name)
    return name


def container_program(
    config: api_pb2.ContainerConfig,
    pod_annotations: Mapping[str, str],
    *,
    program: str,
    policy: str,
    identity: str = "",
) -> Program:
    """The checked description of the container ``config`` describes.

    ``program`` is the image's path in the store, ``policy`` what
    :func:`seccomp_policy` returned, ``identity`` the description's name
    (default: the container's name). Raises
    :class:`~supervisor.errors.DescriptionError` (annotation problems, with
    line and column) or InvalidArgument naming a request field.
    """
    mounts = directory_mounts(config)
    name = config.metadata.name
    key = ANNOTATION_PREFIX + name
    fixed: dict[str, Any] = {"name": identity or name, "program": program, "policy": policy}
    fixed["cwd"] = host_cwd(config.working_dir, mounts)
    signo = stop_signal(config.stop_signal)
    if key not in pod_annotations:
        text = _synthesized(config, mounts, fixed, signo)
        return Program(text, f"container {name}", None, mounts)
    filename = f"pod annotation {key}"
    text = _annotated(pod_annotations[key], filename, fixed, signo)
    description = parse_description(text, filename, context=cri_context(mounts))
    problems = list(_refused_capabilities(description))
    if problems:
        raise DescriptionError(problems)
    return Program(text, filename, description, mounts)


def _stop(signo: int | None) -> dict[str, int] | None:
    return None if signo is None else {"signal": signo}


def _synthesized(
    config: api_pb2.ContainerConfig,
    mounts: Mapping[str, HostMount],
    fixed: dict[str, Any],
    signo: int | None,
) -> str:
    """A description from command, args, envs, working_dir and mounts.

    As in OCI, ``command`` replaces the image's entry point and ``args``
    follow it; the image is the executable, so ``command[0]`` is only the
    name the program is called by and is dropped.
    """
    for i, kv in enumerate(config.envs):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kv.key):
            raise invalid(f"{_FIELD}.envs[{i}].key", f"bad environment variable name {kv.key!r}")
        if kv.key.startswith("LISTEN_"):
            raise invalid(f"{_FIELD}.envs[{i}].key", f"{kv.key} is set by capvisor from the fds")
    lines = [f"{k}: {json.dumps(v)}" for k, v in fixed.items()]
    argv = [*list(config.command)[1:], *config.args]
    lines.append(f"args: {json.dumps(argv)}")
    lines.append(f"env: {json.dumps({kv.key: kv.value for kv in config.envs})}")
    if mounts:
        lines.append("fds:")
        taken: set[str] = set()
        for container_path in mounts:
            name = json.dumps(fd_name(container_path, taken))
            lines.append(f"  {name}: !mount {json.dumps(container_path)}")
    if signo is not None:
        lines.append(f"stop: {json.dumps(_stop(signo))}")
    return "\n".join(lines) + "\n"


def _annotated(text: str, filename: str, fixed: dict[str, Any], signo: int | None) -> str:
    """The annotation's text with the keys the request fixes appended.

    Appending keeps every line and column of the annotation where it was, so
    problems point into the annotation as the pod author wrote it.
    """
    source = Source(filename)
    document = load_yaml(text, source)
    if source.problems:
        raise DescriptionError(source.problems)
    if not isinstance(document, CommentedMap):
        where = source.of(document) or Location(filename, 1, 1)
        raise DescriptionError([Problem(where, "a description is a mapping (YAML)")])
    for key in document:
        if key in REFUSED_KEYS:
            source.error(
                source.key_at(document, key),
                f"{key!r} cannot be set in a CRI program description: {REFUSED_KEYS[key]}",
            )
    if source.problems:
        raise DescriptionError(source.problems)
    extra = dict(fixed)
    if signo is not None and "stop" not in document:
        extra["stop"] = _stop(signo)
    if document.fa.flow_style():
        body = text.rstrip()
        if not body.endswith("}"):
            raise DescriptionError(
                [Problem(Location(filename, 1, 1), "a flow mapping must end with '}'")]
            )
        pairs = ", ".join(f"{k}: {json.dumps(v)}" for k, v in extra.items())
        separator = ", " if document else ""
        return f"{body[:-1]}{separator}{pairs}}}\n"
    indent = " " * (document.lc.col or 0)
    lines = [f"{indent}{k}: {json.dumps(v)}" for k, v in extra.items()]
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _capabilities(description: Description) -> Iterator[tags.Capability]:
    yield description.stdin
    yield description.stdout
    yield description.stderr
    yield from description.fds.values()
    for value in (*description.args, *description.env.values()):
        if isinstance(value, tags.Capability):
            yield value


def _refused_capabilities(description: Description) -> Iterator[Problem]:
    """Capabilities that would reach the host file system past the CRI mounts."""
    seen: set[int] = set()
    for cap in _capabilities(description):
        if id(cap) in seen:
            continue
        seen.add(id(cap))
        match cap:
            case tags.File(path="/dev/null"):
                continue  # the default stdin
            case tags.File():
                yield Problem(
                    cap.location,
                    "!file is not available to CRI containers: name a mount with "
                    "!mount CONTAINER_PATH",
                )
            case tags.Mount(path=str()):
                yield Problem(
                    cap.location,
                    "!mount {path: …} names a host path; a CRI container names its mounts "
                    "by container path: !mount CONTAINER_PATH",
                )
            case (
                tags.Socket(bind=tags.Address(scheme="unix", abstract=False))
                | tags.Socket(connect=tags.Address(scheme="unix", abstract=False))
            ):
                yield Problem(
                    cap.location,
                    "!socket with a unix path reaches the host file system; "
                    "use the switchboard (!server, !connect) instead",
                )
