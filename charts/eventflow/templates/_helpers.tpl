{{/*
Chart name, truncated to 63 characters.
*/}}
{{- define "eventflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name; components append "-<component>", so keep room for the longest suffix.
*/}}
{{- define "eventflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "eventflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "eventflow.labels" -}}
helm.sh/chart: {{ include "eventflow.chart" . }}
{{ include "eventflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eventflow
{{- end }}

{{/*
Selector labels (never change: selectors are immutable).
*/}}
{{- define "eventflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component. Usage: include "eventflow.componentLabels" (dict "root" $ "component" "ingest")
*/}}
{{- define "eventflow.componentLabels" -}}
{{ include "eventflow.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component: name + instance + component.
*/}}
{{- define "eventflow.componentSelectorLabels" -}}
{{ include "eventflow.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Resource name of one component: <fullname>-<component>.
*/}}
{{- define "eventflow.componentName" -}}
{{- printf "%s-%s" (include "eventflow.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Image reference. Usage: include "eventflow.image" (dict "root" $ "image" .Values.ingest.image)
Tag order: image.tag, global.image.tag, appVersion.
*/}}
{{- define "eventflow.image" -}}
{{- $g := .root.Values.global.image }}
{{- $tag := .image.tag | default $g.tag | default .root.Chart.AppVersion }}
{{- if $g.registry }}
{{- printf "%s/%s:%s" $g.registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Redis host:port the services connect to.
*/}}
{{- define "eventflow.redis.hostPort" -}}
{{- printf "%s-redis:6379" (include "eventflow.fullname" .) }}
{{- end }}

{{/*
Name of the Secret holding the Redis ACL passwords (bundled Redis).
*/}}
{{- define "eventflow.redis.secretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis-acl" (include "eventflow.fullname" .)) }}
{{- end }}

{{/*
Redis connection env for one service (EVENTFLOW_REDIS__URL + EVENTFLOW_REDIS__PASSWORD).
Usage: include "eventflow.redisEnv" (dict "root" $ "user" "ingest")
*/}}
{{- define "eventflow.redisEnv" -}}
{{- $v := .root.Values.redis }}
{{- if $v.enabled }}
- name: EVENTFLOW_REDIS__URL
  value: {{ printf "redis://%s@%s/0" .user (include "eventflow.redis.hostPort" .root) | quote }}
- name: EVENTFLOW_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "eventflow.redis.secretName" .root }}
      key: {{ .user }}
{{- else }}
- name: EVENTFLOW_REDIS__URL
  {{- if $v.external.username }}
  value: {{ regexReplaceAll "^(rediss?://)" $v.external.url (printf "${1}%s@" $v.external.username) | quote }}
  {{- else }}
  value: {{ $v.external.url | quote }}
  {{- end }}
{{- if $v.external.existingSecret }}
- name: EVENTFLOW_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.external.existingSecret }}
      key: {{ $v.external.passwordKey }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by every EventFlow pod.
*/}}
{{- define "eventflow.podCommon" -}}
{{- with .root.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.global.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Cross-field checks; each failure names the value path and the fix.
*/}}
{{- define "eventflow.validateValues" -}}
{{- $errors := list }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) }}
{{- $errors = append $errors "redis.external.url: required when redis.enabled=false; set it to redis://host:port/db or set redis.enabled=true" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.external.url }}
{{- $errors = append $errors "redis.external.url: set while redis.enabled=true; clear it or set redis.enabled=false" }}
{{- end }}
{{- if and .Values.redis.external.url (not (regexMatch "^rediss?://[^@/]+(/[0-9]+)?$" .Values.redis.external.url)) }}
{{- $errors = append $errors "redis.external.url: must be redis://host:port[/db] or rediss://... without credentials; put the password in redis.external.existingSecret" }}
{{- end }}
{{- if le (int .Values.consumer.terminationGracePeriodSeconds) (int .Values.consumer.drainTimeoutS) }}
{{- $errors = append $errors "consumer.terminationGracePeriodSeconds: must be greater than consumer.drainTimeoutS, or Kubernetes kills workers mid-drain; raise it" }}
{{- end }}
{{- if le (int .Values.reaper.minIdleMs) (int .Values.consumer.leaseTtlMs) }}
{{- $errors = append $errors "reaper.minIdleMs: must be greater than consumer.leaseTtlMs, or the reaper reclaims entries whose lease is still live; raise it" }}
{{- end }}
{{- if gt (int .Values.consumer.keda.minReplicaCount) (int .Values.consumer.keda.maxReplicaCount) }}
{{- $errors = append $errors "consumer.keda.minReplicaCount: must not exceed consumer.keda.maxReplicaCount" }}
{{- end }}
{{- if and .Values.ingest.auth.allowAnonymous (or .Values.ingest.auth.existingSecret .Values.ingest.auth.tokens) }}
{{- $errors = append $errors "ingest.auth.allowAnonymous: true together with tokens; choose one (unset allowAnonymous to require tokens)" }}
{{- end }}
{{- if and .Values.ingest.auth.existingSecret .Values.ingest.auth.tokens }}
{{- $errors = append $errors "ingest.auth.tokens: set together with ingest.auth.existingSecret; use one of them" }}
{{- end }}
{{- if and .Values.operator.enabled (not .Values.crds.install) (not (.Capabilities.APIVersions.Has "eventflow.io/v1alpha1")) }}
{{- $errors = append $errors "crds.install: false but the eventflow.io/v1alpha1 CRDs are not in the cluster; set crds.install=true or operator.enabled=false" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nVALUES VALIDATION:\n%s" (join "\n" $errors)) }}
{{- end }}
{{- end }}
