{{/* Names, labels and the choices several templates share. */}}

{{- define "cmbcluster.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cmbcluster.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects: unique per namespace and release. */}}
{{- define "cmbcluster.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "cmbcluster.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels. Never app.kubernetes.io/managed-by=cmbcluster: that marks user environments. */}}
{{- define "cmbcluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "cmbcluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
cmbcluster.io/cloud-provider: {{ .Values.global.cloudProvider | quote }}
{{- end -}}

{{- define "cmbcluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cmbcluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- /* cmbcluster.kubernetes.routing.CONTROL_PLANE_SELECTOR: user pods admit traffic from these labels */}}
app.kubernetes.io/component: control-plane
{{- end -}}

{{- define "cmbcluster.serviceAccountName" -}}
{{- default (include "cmbcluster.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "cmbcluster.environmentsNamespace" -}}
{{- default .Release.Namespace .Values.environments.namespace -}}
{{- end -}}

{{- /* environments.routing, or its default: proxy, unless a domain asks for host routing (ingress only) */}}
{{- define "cmbcluster.routing" -}}
{{- .Values.environments.routing | default (ternary "ingress" "proxy" (not (empty .Values.environments.domain))) -}}
{{- end -}}

{{- define "cmbcluster.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The volume driver: storage.driver, else the first-party cloud's. */}}
{{- define "cmbcluster.storageDriver" -}}
{{- $defaults := dict "gcp" "gcsfuse" "aws" "mountpoint-s3" -}}
{{- default (get $defaults .Values.global.cloudProvider) .Values.storage.driver -}}
{{- end -}}

{{/* global.<cloudProvider> of a cloud from a third-party plugin (env, podLabels, podAnnotations,
serviceAccountAnnotations); an empty dict for gcp and aws, whose values the chart reads by name. */}}
{{- define "cmbcluster.pluginCloud" -}}
{{- $cloud := .Values.global.cloudProvider -}}
{{- if has $cloud (list "gcp" "aws") -}}{}{{- else -}}{{- toJson (get .Values.global $cloud | default dict) -}}{{- end -}}
{{- end -}}

{{/* Whether the storage driver mounts through PersistentVolumes the control plane creates. */}}
{{- define "cmbcluster.storagePersistentVolumes" -}}
{{- $known := dict "mountpoint-s3" true -}}
{{- $pv := .Values.storage.persistentVolumes -}}
{{- if kindIs "invalid" $pv -}}{{- $pv = get $known (include "cmbcluster.storageDriver" .) | default false -}}{{- end -}}
{{- if $pv -}}true{{- end -}}
{{- end -}}

{{/* The ClusterRole for PersistentVolumes (CLUSTER_RULES). Needed with every storage driver today:
the control plane creates static PVs for mountpoint-s3, and looks for an environment's PVs by label
when it stops or deletes one, whatever the driver. */}}
{{- define "cmbcluster.createClusterRole" -}}
{{- if and .Values.rbac.create .Values.rbac.clusterRole.create -}}true{{- end -}}
{{- end -}}

{{/* The external database, if any: SQLite on a claim otherwise. */}}
{{- define "cmbcluster.externalDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* RBAC rules: values when given, else the file generated from cmbcluster/kubernetes/rbac.py. */}}
{{- define "cmbcluster.rbacFile" -}}
{{- $file := .Files.Get "files/rbac.json" -}}
{{- if not $file -}}
{{- fail "files/rbac.json is missing from the chart: regenerate it with `nox -s helm-rbac`" -}}
{{- end -}}
{{- $file -}}
{{- end -}}

{{- define "cmbcluster.namespacedRules" -}}
{{- $file := include "cmbcluster.rbacFile" . | fromJson -}}
{{- toYaml (default $file.namespacedRules .Values.rbac.namespacedRules) -}}
{{- end -}}

{{- define "cmbcluster.clusterRules" -}}
{{- $file := include "cmbcluster.rbacFile" . | fromJson -}}
{{- toYaml (default $file.clusterRules .Values.rbac.clusterRules) -}}
{{- end -}}

{{/* Checks across values that the schema cannot word clearly. */}}
{{- define "cmbcluster.validate" -}}
{{- $cloud := .Values.global.cloudProvider -}}
{{- if and (eq $cloud "gcp") (not .Values.global.gcp.projectId) -}}
{{- fail "global.gcp.projectId is required when global.cloudProvider is gcp (the Google Cloud project id)" -}}
{{- end -}}
{{- if and (eq $cloud "aws") (not .Values.global.aws.region) -}}
{{- fail "global.aws.region is required when global.cloudProvider is aws (for example eu-west-1)" -}}
{{- end -}}
{{- if and (eq $cloud "aws") (not .Values.global.aws.accountId) -}}
{{- fail "global.aws.accountId is required when global.cloudProvider is aws (12 digits)" -}}
{{- end -}}
{{- if and (gt (int .Values.controlPlane.replicas) 1) (not (include "cmbcluster.externalDatabase" .)) -}}
{{- fail (printf "controlPlane.replicas is %d but SQLite allows one replica: set database.url (PostgreSQL) or database.existingSecret to run several" (int .Values.controlPlane.replicas)) -}}
{{- end -}}
{{- if and .Values.database.url .Values.database.existingSecret -}}
{{- fail "set database.url or database.existingSecret, not both" -}}
{{- end -}}
{{- if and (include "cmbcluster.storagePersistentVolumes" .) (not (include "cmbcluster.createClusterRole" .)) -}}
{{- fail (printf "storage.driver %s mounts buckets through PersistentVolumes the control plane creates: rbac.create and rbac.clusterRole.create must stay true" (include "cmbcluster.storageDriver" .)) -}}
{{- end -}}
{{- if and (eq .Values.environments.routing "proxy") .Values.environments.domain -}}
{{- fail "environments.domain (host routing) needs environments.routing ingress; proxy serves ingress.host/environments/<id>/" -}}
{{- end -}}
{{- if eq .Values.image.tag "latest" -}}
{{- fail "image.tag must be an exact version, not latest: upgrades and rollbacks must know what they run" -}}
{{- end -}}
{{- if and .Values.secretKey.value (lt (len .Values.secretKey.value) 32) -}}
{{- fail "secretKey.value must be at least 32 random characters (openssl rand -hex 32), or empty to generate one" -}}
{{- end -}}
{{- if and .Values.secretKey.value .Values.secretKey.existingSecret -}}
{{- fail "set secretKey.value or secretKey.existingSecret, not both" -}}
{{- end -}}
{{- end -}}
