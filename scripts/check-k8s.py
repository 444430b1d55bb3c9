#!/usr/bin/env python3
"""Checks a kustomization of tether's Kubernetes manifests (default: deploy/k8s).

Renders it with `kubectl kustomize`, validates every object against the Kubernetes API's
schemas (kubernetes-validate, strict: an unknown field is an error, and so is a kind it has no
schema for) for KUBERNETES_VERSION, then checks what the schemas cannot:
- every container runs as non-root, on a read-only root filesystem, without privilege
  escalation, with every capability dropped, with CPU and memory requests and limits;
- every Deployment's containers have readiness and liveness probes;
- every tether node reaches the bus at the three NATS members with 3 KV replicas, as its own
  NATS user, and every `TETHER_*_FILE` it is given is a file one of its volumes provides;
- the container orchestrator is a DaemonSet holding the host's Docker socket, with its host id
  from the Kubernetes node's name;
- NATS is a 3-member StatefulSet with volume claims behind a headless Service, and its
  configuration includes the authorization from a Secret in the same folder;
- a PodDisruptionBudget with minAvailable leaves a replica to evict; no Secret is rendered
  (keys never live in the repository); a default-deny NetworkPolicy exists.

Prints one line when all is well; else every problem, and exits 1 (2: a tool is missing).
`just k8s-check` runs it; so does tests/k8s.rs, under `just test`.
"""

import subprocess
import sys


def die(message):
    print(f"check-k8s: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import kubernetes_validate as kv
    import yaml
except ImportError as e:
    die(f"{e.name} is missing: scripts/install-deps.sh installs kubernetes-validate (and PyYAML)")

KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "tether"
NODE_IMAGE = "tether/nodes:"
NATS_URL = ",".join(f"nats://nats-{i}.nats:4222" for i in range(3))
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
NODES = ("permission-node", "container-orchestrator", "shell-server", "model-gateway", "a2a-gateway")


def render(path):
    try:
        out = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True)
    except FileNotFoundError:
        die("kubectl not found (it renders the kustomization): install kubectl")
    if out.returncode != 0:
        print(f"check-k8s: `kubectl kustomize {path}` failed:\n{out.stderr}", file=sys.stderr)
        sys.exit(1)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when PyYAML has it
    return [d for d in yaml.load_all(out.stdout, Loader=loader) if d]


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def validate(objs, problems):
    for obj in objs:
        try:
            kv.validate(obj, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{name(obj)}: {path}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            problems.append(f"{name(obj)}: {e.message}")
    return kv.__version__


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def env_of(c, config_maps):
    """The container's environment: envFrom ConfigMaps, then env (values or fieldRefs)."""
    env = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            env.update(config_maps.get(ref["name"], {}))
    for e in c.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e.get("value", f"fieldRef:{field}" if field else None)
    return env


def provided_files(c, spec):
    """Files the container's volumes provide: exact paths for items, else whole folders."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files, folders = set(), set()
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        sources = [v[k] for k in ("secret", "configMap") if k in v]
        sources += [s[k] for s in v.get("projected", {}).get("sources", []) for k in s]
        items = [i for s in sources for i in s.get("items", [])]
        if items:
            files.update(f"{m['mountPath']}/{i['path']}" for i in items)
        else:
            folders.add(m["mountPath"])
    return files, folders


def check_container(where, c, pod_sc, problems):
    sc = c.get("securityContext", {})
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{where}: not runAsNonRoot")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: root filesystem not readOnlyRootFilesystem")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities do not drop ALL")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(res.get(kind, {}))
        if missing:
            problems.append(f"{where}: no {kind} for {', '.join(sorted(missing))}")


def check_node(where, c, spec, env, problems):
    """A tether node: the bus, its own NATS user, and the files it is told to read."""
    if env.get("TETHER_NATS_URL") != NATS_URL:
        problems.append(f"{where}: TETHER_NATS_URL is {env.get('TETHER_NATS_URL')!r}, not {NATS_URL!r}")
    if env.get("TETHER_KV_REPLICAS") != "3":
        problems.append(f"{where}: TETHER_KV_REPLICAS is not 3")
    node = c["command"][0] if c.get("command") else "?"
    nkey = env.get("TETHER_NATS_NKEY_FILE") or ""
    if not nkey.endswith(f"/{node}.nk"):
        problems.append(f"{where}: TETHER_NATS_NKEY_FILE {nkey!r} is not {node}'s own key")
    files, folders = provided_files(c, spec)
    for k, v in sorted(env.items()):
        if k.startswith("TETHER_") and k.endswith("_FILE"):
            if v not in files and not any(str(v).startswith(f + "/") for f in folders):
                problems.append(f"{where}: {k}={v} is in none of its volumes")


def check_orchestrator(obj, problems):
    where = name(obj)
    if obj["kind"] != "DaemonSet":
        problems.append(f"{where}: the orchestrator must be a DaemonSet (one per Docker host)")
        return
    spec = obj["spec"]["template"]["spec"]
    sockets = {v["name"] for v in spec.get("volumes", [])
               if v.get("hostPath", {}).get("path") == "/var/run/docker.sock"}
    c = spec["containers"][0]
    if not any(m["name"] in sockets and m["mountPath"] == "/var/run/docker.sock"
               for m in c.get("volumeMounts", [])):
        problems.append(f"{where}: does not mount the host's /var/run/docker.sock")
    if env_of(c, {}).get("TETHER_HOST_ID") != "fieldRef:spec.nodeName":
        problems.append(f"{where}: TETHER_HOST_ID is not the node's name (spec.nodeName)")


def check_nats(obj, services, config_maps, problems):
    where = name(obj)
    spec = obj["spec"]
    if spec.get("replicas") != 3:
        problems.append(f"{where}: NATS needs 3 replicas (a JetStream quorum), has {spec.get('replicas')}")
    if not spec.get("volumeClaimTemplates"):
        problems.append(f"{where}: no volumeClaimTemplates for the JetStream store")
    svc = services.get(spec.get("serviceName"))
    if not svc or svc["spec"].get("clusterIP") != "None":
        problems.append(f"{where}: serviceName {spec.get('serviceName')!r} is not a headless Service")
    pod = spec["template"]["spec"]
    config = [v for v in pod.get("volumes", []) if "projected" in v]
    sources = [s for v in config for s in v["projected"]["sources"]]
    conf = [config_maps.get(s["configMap"]["name"], {}) for s in sources if "configMap" in s]
    if not any('include "authorization.conf"' in d.get("nats.conf", "") for d in conf):
        problems.append(f"{where}: nats.conf does not include authorization.conf")
    if not any(i["path"] == "authorization.conf" for s in sources if "secret" in s
               for i in s["secret"].get("items", [])):
        problems.append(f"{where}: authorization.conf does not come from a Secret beside nats.conf")


def check(objs, problems):
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    workloads = [o for o in objs if o["kind"] in WORKLOADS]
    if not any(o["kind"] == "Namespace" and o["metadata"]["name"] == NAMESPACE for o in objs):
        problems.append(f"no Namespace {NAMESPACE}")
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{name(o)}: not in namespace {NAMESPACE}")
        if o["kind"] == "Secret":
            problems.append(f"{name(o)}: a Secret is rendered (keys are created by the operator, README)")
    for o in workloads:
        spec = o["spec"]["template"]["spec"]
        for c in containers(spec):
            where = f"{name(o)} container {c['name']}"
            check_container(where, c, spec.get("securityContext", {}), problems)
            if o["kind"] == "Deployment":
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        problems.append(f"{where}: no {probe}")
            if c.get("image", "").startswith(NODE_IMAGE):
                check_node(where, c, spec, env_of(c, config_maps), problems)
    by_name = {o["metadata"]["name"]: o for o in workloads}
    for node in ("nats",) + NODES:
        if node not in by_name:
            problems.append(f"no workload {node}")
            continue
        images = [c.get("image", "") for c in by_name[node]["spec"]["template"]["spec"]["containers"]]
        if node in NODES and not all(i.startswith(NODE_IMAGE) for i in images):
            problems.append(f"{name(by_name[node])}: runs {images}, not the image {NODE_IMAGE}<tag>")
    if "container-orchestrator" in by_name:
        check_orchestrator(by_name["container-orchestrator"], problems)
    if "nats" in by_name:
        check_nats(by_name["nats"], services, config_maps, problems)
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        targets = [w for w in workloads
                   if sel.items() <= w["spec"]["selector"].get("matchLabels", {}).items()]
        if not targets:
            problems.append(f"{name(pdb)}: selects no workload")
        least = pdb["spec"].get("minAvailable")
        for w in targets:
            if isinstance(least, int) and w["spec"].get("replicas", 1) <= least:
                problems.append(f"{name(pdb)}: minAvailable {least} leaves no replica of {name(w)} to evict")
    if not any(o["kind"] == "NetworkPolicy" and not o["spec"]["podSelector"]
               and set(o["spec"].get("policyTypes", [])) == {"Ingress", "Egress"} for o in objs):
        problems.append("no default-deny NetworkPolicy (empty podSelector, Ingress and Egress)")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s"
    objs = render(path)
    problems = []
    version = validate(objs, problems)
    check(objs, problems)
    if problems:
        print(f"check-k8s: {path}: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        sys.exit(1)
    print(f"check-k8s: {path}: {len(objs)} objects valid for Kubernetes {KUBERNETES_VERSION} "
          f"(kubernetes-validate {version}, strict) and every invariant holds")


if __name__ == "__main__":
    main()
