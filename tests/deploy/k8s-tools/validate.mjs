// Validates Kubernetes custom resources (a JSON array on stdin) with the validators that
// kubernetes-models generates from each operator's own CRD OpenAPI schema, and prints one JSON
// object per resource: {kind, name, model, errors}. A resource whose group has no model here gets
// model: null, so the caller can tell "not checked" from "valid".
import { readFileSync } from "node:fs";

const PACKAGES = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of docs) {
  const [group, version] = doc.apiVersion.split("/");
  const name = doc.metadata?.name;
  const pkg = PACKAGES[group];
  if (!pkg) {
    results.push({ kind: doc.kind, name, model: null, errors: [] });
    continue;
  }
  const module = `${pkg}/${group}/${version}/${doc.kind}`;
  const Model = (await import(module))[doc.kind];
  let errors = [];
  try {
    new Model(doc).validate();
  } catch (err) {
    errors = [String(err.message ?? err)];
  }
  results.push({ kind: doc.kind, name, model: module, errors });
}
process.stdout.write(JSON.stringify(results));
