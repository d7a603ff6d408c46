{{- define "vpc-ebpf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vpc-ebpf.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "vpc-ebpf.name" . -}}
{{- end -}}
{{- end -}}

{{- define "vpc-ebpf.labels" -}}
app.kubernetes.io/name: {{ include "vpc-ebpf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
k8s-app: {{ include "vpc-ebpf.name" . }}
{{- end -}}

{{- define "vpc-ebpf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vpc-ebpf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vpc-ebpf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vpc-ebpf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag of an image section, aws-vpc-cni's override_repo first. */}}
{{- define "vpc-ebpf.image" -}}
{{- $img := .img -}}
{{- $repo := coalesce $img.override_repo $img.repository .root.Values.image.override_repo .root.Values.image.repository -}}
{{- $tag := coalesce $img.tag .root.Values.image.tag .root.Chart.AppVersion -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
