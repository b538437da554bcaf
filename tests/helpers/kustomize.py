"""A small, pure-Python ``kustomize build`` for the manifests under deploy/k8s (no kubectl in CI).

It implements exactly the kustomization fields those manifests use -- ``resources`` (files and
folders), ``namespace``, ``labels`` (``includeTemplates``; not ``includeSelectors``), ``replicas``, ``images`` and
``patches`` (strategic-merge files, matched by kind and name) -- and refuses any other field, so a
manifest can never use a feature this renderer would silently ignore. Strategic merge follows
Kubernetes' rules for what these manifests patch: maps merge, lists of maps with a ``name`` merge by
name (containers, ports, env, volumes, volumeMounts), other lists are replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "replicas", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


class KustomizeError(ValueError):
    pass


def build(folder: str | Path) -> list[dict[str, Any]]:
    """The rendered objects of the kustomization in ``folder``, in resource order."""
    folder = Path(folder)
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}: unsupported kustomization fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += build(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) - {"path"}:
            raise KustomizeError(f"{folder}: only file patches ('path') are supported: {patch_entry}")
        for patch in yaml.safe_load_all((folder / patch_entry["path"]).read_text()):
            target = _find(objects, patch["kind"], patch["metadata"]["name"], folder)
            merged = strategic_merge(target, patch)
            target.clear()
            target.update(merged)
    for rep in spec.get("replicas", []):
        scalable = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")]
        _find(scalable, None, rep["name"], folder)["spec"]["replicas"] = rep["count"]
    for image in spec.get("images", []):
        _set_images(objects, image)
    for label in spec.get("labels", []):
        if label.get("includeSelectors", False):
            raise KustomizeError("labels with includeSelectors: true are not supported here")
        _add_labels(objects, label["pairs"], label.get("includeTemplates", False))
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def strategic_merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = copy.deepcopy(base)
        index = {item["name"]: i for i, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = strategic_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _named(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _find(objects: list[dict], kind: str | None, name: str, folder: Path) -> dict:
    found = [o for o in objects if o["metadata"]["name"] == name and (kind is None or o["kind"] == kind)]
    if len(found) != 1:
        raise KustomizeError(f"{folder}: {kind or 'object'} {name!r} matches {len(found)} resources")
    return found[0]


def _pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def _set_images(objects: list[dict], image: dict) -> None:
    for obj in objects:
        pod = _pod_spec(obj)
        for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            name = container["image"].split("@")[0].rsplit(":", 1)[0]
            if name != image["name"]:
                continue
            new = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{new}@{image['digest']}"
            else:
                container["image"] = f"{new}:{image.get('newTag', 'latest')}"


def _add_labels(objects: list[dict], pairs: dict, templates: bool) -> None:
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if templates and _pod_spec(obj) is not None:
            obj["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
