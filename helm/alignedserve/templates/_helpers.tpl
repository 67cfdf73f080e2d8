{{/*
Names, labels and images: every template takes them from here, so they cannot drift.
*/}}

{{/* The chart's name (app.kubernetes.io/name), "alignedserve" unless nameOverride. */}}
{{- define "alignedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of object names: the release name, plus the chart name when it lacks it. */}}
{{- define "alignedserve.fullname" -}}
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

{{/* Name of the operator's Deployment, Service, ClusterRole and ClusterRoleBinding. */}}
{{- define "alignedserve.operator.fullname" -}}
{{- printf "%s-operator" (include "alignedserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* helm.sh/chart label value. */}}
{{- define "alignedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "alignedserve.labels" -}}
helm.sh/chart: {{ include "alignedserve.chart" . }}
{{ include "alignedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alignedserve
{{- end }}

{{/* Labels that identify the release's objects (immutable: used in selectors). */}}
{{- define "alignedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's labels and selector. The component label keeps the selector off an
AlignedServe's own pods, which carry the same name label and may share the instance name.
*/}}
{{- define "alignedserve.operator.labels" -}}
{{ include "alignedserve.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "alignedserve.operator.selectorLabels" -}}
{{ include "alignedserve.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "alignedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alignedserve.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image's tag: image.tag, else the chart's appVersion. */}}
{{- define "alignedserve.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* The operator image. */}}
{{- define "alignedserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "alignedserve.imageTag" .) }}
{{- end }}

{{/* The image of AlignedServe pods whose spec names none (the Dockerfile's gpu target). */}}
{{- define "alignedserve.defaultWorkloadImage" -}}
{{- default (printf "%s:%s-gpu" .Values.image.repository (include "alignedserve.imageTag" .)) .Values.defaultWorkloadImage }}
{{- end }}

{{/*
The operator's arguments after `alignedserve`: kopf's single-instance mode (no peering, so
exactly one replica), its namespaces (one --namespace followed by every name: the flag takes
a list, and a repeated flag would keep only its last list), liveness endpoint, metrics port.
*/}}
{{- define "alignedserve.operator.args" -}}
- --log-level
- {{ .Values.operator.logLevel | quote }}
- operator
- --standalone
{{- with .Values.operator.watchNamespaces }}
- --namespace
{{- range . }}
- {{ . | quote }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --liveness
- {{ printf "http://0.0.0.0:%d/healthz" (int .Values.operator.healthPort) | quote }}
- --metrics-port
- {{ printf "%d" (int .Values.operator.metricsPort) | quote }}
- --metrics-host
- "0.0.0.0"
- --interval-s
- {{ .Values.operator.intervalSeconds | toString | quote }}
{{- with .Values.operator.prometheusUrl }}
- --prometheus-url
- {{ . | quote }}
{{- end }}
- --log-format
- {{ .Values.operator.logFormat | quote }}
{{- end }}
