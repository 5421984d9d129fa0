{{- define "outpost.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "outpost.labels" -}}
app.kubernetes.io/name: airflow-outpost
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The stop budget of a worker group: Settings.stop_budget_s() = drain + kill grace + 10 + 30. */}}
{{- define "outpost.stopBudget" -}}
{{- add .drainTimeoutSeconds .killGraceSeconds 40 -}}
{{- end -}}

{{- define "outpost.rayAddress" -}}
{{- if .Values.ray.existingAddress -}}{{ .Values.ray.existingAddress }}
{{- else if .Values.ray.enabled -}}ray://{{ include "outpost.fullname" . }}-ray-head-svc.{{ .Release.Namespace }}.svc:10001
{{- end -}}
{{- end -}}

{{/*
The worker pod spec, shared by the StatefulSet and the ScaledJob's Job template.
Context: dict "root" $ "name" <group name> "group" <values of the group> "job" <bool>.
*/}}
{{- define "outpost.workerPod" -}}
{{- $root := .root -}}{{- $g := .group -}}{{- $full := include "outpost.fullname" $root -}}
{{- $grace := add (include "outpost.stopBudget" $g) 10 }}
terminationGracePeriodSeconds: {{ $grace }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- if .job }}
restartPolicy: Never
{{- end }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: outpost
    image: "{{ $root.Values.image.repository }}:{{ if gt (int $g.gpus) 0 }}{{ $root.Values.image.gpuTag }}{{ else }}{{ $root.Values.image.cpuTag }}{{ end }}"
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    envFrom:
      - configMapRef:
          name: {{ $full }}-{{ .name }}
    env:
      - name: OUTPOST_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: OUTPOST_JWT_SECRET_FILE
        value: /etc/outpost/jwt/jwt_secret
      {{- if .job }}
      # Ephemeral worker: take work until idle, then drain, sign off and exit 0 (a Job's success).
      - name: OUTPOST_EXIT_WHEN_IDLE_S
        value: {{ $g.exitWhenIdle | quote }}
      - name: OUTPOST_IDLE_EXIT_CODE
        value: "0"
      {{- end }}
    ports:
      - name: metrics
        containerPort: 9464
        protocol: TCP
    startupProbe:
      httpGet: {path: /healthz, port: metrics}
      periodSeconds: 5
      failureThreshold: 36
    livenessProbe:
      httpGet: {path: /healthz, port: metrics}
      periodSeconds: 20
      timeoutSeconds: 5
    readinessProbe:
      httpGet: {path: /readyz, port: metrics}
      periodSeconds: 10
      timeoutSeconds: 5
    resources:
      requests:
        {{- toYaml $g.resources.requests | nindent 8 }}
        {{- if gt (int $g.gpus) 0 }}
        nvidia.com/gpu: {{ $g.gpus }}
        {{- end }}
      limits:
        {{- toYaml $g.resources.limits | nindent 8 }}
        {{- if gt (int $g.gpus) 0 }}
        nvidia.com/gpu: {{ $g.gpus }}
        {{- end }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: ["ALL"]
    volumeMounts:
      - {name: state, mountPath: /var/lib/outpost}
      - {name: jwt-secret, mountPath: /etc/outpost/jwt, readOnly: true}
      - {name: dshm, mountPath: /dev/shm}
      - {name: tmp, mountPath: /tmp}
volumes:
  - name: jwt-secret
    secret:
      secretName: {{ $root.Values.controlPlane.jwtSecretName }}
      defaultMode: 0440
      items:
        - {key: jwt_secret, path: jwt_secret}
  - name: dshm
    emptyDir: {medium: Memory, sizeLimit: 2Gi}
  - name: tmp
    emptyDir: {sizeLimit: 4Gi}
  {{- if .job }}
  # An ephemeral worker's state lives as long as its pod: it signs off with nothing left to send.
  - name: state
    emptyDir: {sizeLimit: {{ $g.storage }}}
  {{- end }}
{{- end -}}
