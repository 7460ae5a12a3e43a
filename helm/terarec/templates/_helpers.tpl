{{/* Names, labels and the pieces every pod of the release shares. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "terarec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The base of every resource name: fullnameOverride, or "<release>-<name>" (just the release when it already holds the name). Kept to 40 characters: KubeRay appends suffixes such as "-head-svc" and worker pod names. */}}
{{- define "terarec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := include "terarec.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the pods of this release (all of them, Ray pods included). */}}
{{- define "terarec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "terarec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "terarec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "terarec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: terarec
{{- end }}

{{/* The image reference: tag defaults to "<appVersion>-<variant>". */}}
{{- define "terarec.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "terarec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "terarec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret name and key of a token; call with (dict "root" $ "token" .Values.auth.apiToken "suffix" "api-token"). */}}
{{- define "terarec.tokenSecretName" -}}
{{- .token.existingSecret | default (printf "%s-%s" (include "terarec.fullname" .root) .suffix) }}
{{- end }}
{{- define "terarec.tokenSecretKey" -}}
{{- if .token.existingSecret }}{{ .token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* A Secret holding a generated or given token, unless existingSecret names one. A generated token is read back from the live Secret on upgrade so it does not change. */}}
{{- define "terarec.tokenSecret" -}}
{{- if not .token.existingSecret }}
{{- $name := include "terarec.tokenSecretName" . }}
{{- $live := (lookup "v1" "Secret" .root.Release.Namespace $name).data | default dict }}
{{- $value := .token.value | default (get $live "token" | b64dec) | default (randAlphaNum 48) }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  labels:
    {{- include "terarec.labels" .root | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
type: Opaque
data:
  token: {{ $value | b64enc | quote }}
{{- end }}
{{- end }}

{{/* The RayCluster's name and the head Service KubeRay creates for it. */}}
{{- define "terarec.rayClusterName" -}}
{{- include "terarec.fullname" . }}
{{- end }}
{{- define "terarec.rayHeadService" -}}
{{- printf "%s-head-svc" (include "terarec.rayClusterName" .) }}
{{- end }}

{{/* TERAREC_STORAGE: the object-store URI, or the shared volume's mount path. */}}
{{- define "terarec.storage" -}}
{{- .Values.storage.uri | default .Values.storage.pvc.mountPath }}
{{- end }}

{{/* Environment of every terarec and Ray container: Ray token auth, storage, default config, extraEnv. */}}
{{- define "terarec.env" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "terarec.tokenSecretName" (dict "root" . "token" .Values.auth.rayToken "suffix" "ray-token") }}
      key: {{ include "terarec.tokenSecretKey" (dict "token" .Values.auth.rayToken) }}
- name: TERAREC_STORAGE
  value: {{ include "terarec.storage" . | quote }}
- name: TERAREC_DEFAULT_CONFIG
  value: /etc/terarec/train.yaml
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level security context: non-root uid/gid 1000. */}}
{{- define "terarec.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: no privilege escalation, no capabilities, read-only root (writable paths are emptyDirs). */}}
{{- define "terarec.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Volumes of a Ray pod; call with (dict "root" $ "shmSize" "4Gi"). */}}
{{- define "terarec.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: config
  configMap:
    name: {{ include "terarec.fullname" .root }}-config
{{- if not .root.Values.storage.uri }}
- name: storage
  persistentVolumeClaim:
    claimName: {{ .root.Values.storage.pvc.existingClaim | default (printf "%s-storage" (include "terarec.fullname" .root)) }}
{{- end }}
{{- end }}

{{/* Volume mounts of a Ray container. */}}
{{- define "terarec.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: config
  mountPath: /etc/terarec
  readOnly: true
{{- if not .Values.storage.uri }}
- name: storage
  mountPath: {{ .Values.storage.pvc.mountPath }}
{{- end }}
{{- end }}
