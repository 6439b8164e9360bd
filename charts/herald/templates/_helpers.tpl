{{/*
The chart's name, truncated to 63 characters (a label value's limit).
*/}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name, with the chart's name unless the
release name already contains it.
*/}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding): the full
name plus the release's namespace, so that releases of the same name in
different namespaces do not collide.
*/}}
{{- define "herald.clusterName" -}}
{{- printf "%s-%s" (include "herald.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespaces herald watches: "" (every namespace) with rbac.scope=cluster,
else rbac.watchNamespaces joined with commas (default: the release's
namespace), as `herald run --namespace` takes them.
*/}}
{{- define "herald.watchNamespaces" -}}
{{- if eq .Values.rbac.scope "namespaced" }}
{{- $list := .Values.rbac.watchNamespaces | default (list .Release.Namespace) }}
{{- join "," $list }}
{{- end }}
{{- end }}

{{/*
The Lease this release's replicas contend for (herald run --lease-name).
*/}}
{{- define "herald.leaseName" -}}
{{ include "herald.fullname" . }}
{{- end }}

{{/*
The herald CRDs (crds/), which the operator reads to wait until they are established.
*/}}
{{- define "herald.crdNames" -}}
- audiences.herald.dev
- batches.herald.dev
- cancellations.herald.dev
- channels.herald.dev
- memberslices.herald.dev
- objects.herald.dev
- recipientpages.herald.dev
- schedules.herald.dev
- tenants.herald.dev
- throttles.herald.dev
- triggerruns.herald.dev
- users.herald.dev
- workflows.herald.dev
{{- end }}

{{/*
What herald does in the namespaces it watches, and nothing more:
- reads every herald kind (watch caches, the API);
- writes status of Workflows, TriggerRuns, RecipientPages, Channels and Schedules (server-side apply);
- creates TriggerRuns and Cancellations (the API) and deletes them (TTL, retention);
- patches a small TriggerRun's metadata once (the recipient run ids the API finds its inline records by);
- creates and updates RecipientPages (server-side apply) and deletes them with their run;
- creates, replaces (optimistic concurrency) and deletes Batches (batch steps);
- creates, replaces and deletes Throttles (throttle steps' windows; conditional writes);
- creates, updates and deletes Schedules (the schedules API) and writes their status (the schedule controller);
- creates, updates and deletes Users, Objects and Tenants (inline identify, the API);
- creates, replaces and deletes MemberSlices (subscriptions and audience members, the API);
- publishes Events (kube-runtime's Recorder: events.k8s.io/v1; core events for older clients);
- reads the Secrets Channels name (get only; API keys live in the key
  namespace, see herald.apiKeyNamespace and the api-keys Role).
*/}}
{{- define "herald.namespaceRules" -}}
- apiGroups: [herald.dev]
  resources: [workflows, audiences, channels]
  verbs: [get, list, watch]
- apiGroups: [herald.dev]
  resources: [triggerruns]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [herald.dev]
  resources: [cancellations]
  verbs: [get, list, watch, create, delete]
- apiGroups: [herald.dev]
  resources: [recipientpages]
  verbs: [get, list, watch, create, patch, delete, deletecollection]
- apiGroups: [herald.dev]
  resources: [batches]
  verbs: [get, list, watch, create, update, delete]
- apiGroups: [herald.dev]
  resources: [throttles]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [herald.dev]
  resources: [schedules]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [herald.dev]
  resources: [memberslices]
  verbs: [get, list, watch, create, update, delete]
- apiGroups: [herald.dev]
  resources: [users, objects, tenants]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [herald.dev]
  resources: [workflows/status, triggerruns/status, recipientpages/status, channels/status, schedules/status]
  verbs: [get, patch, update]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}

{{/* The namespace whose labelled Secrets are API keys. */}}
{{- define "herald.apiKeyNamespace" -}}
{{- .Values.apiKeys.namespace | default .Release.Namespace -}}
{{- end }}

{{/*
Cluster-scoped needs, whatever rbac.scope is: the HTTP API checks Kubernetes
tokens (TokenReview) and their permissions (SubjectAccessReview), and the
operator waits for its CRDs.
*/}}
{{- define "herald.clusterRules" -}}
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
- apiGroups: [authorization.k8s.io]
  resources: [subjectaccessreviews]
  verbs: [create]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames:
{{ include "herald.crdNames" . | indent 4 }}
  verbs: [get, list, watch]
{{- end }}
