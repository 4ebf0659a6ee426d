{{/* The pod template shared by the StatefulSet and the Deployment. */}}
{{- define "berth.podTemplate" -}}
metadata:
  labels:
    {{- include "berth.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Pods roll when berth.toml changes.
    checksum/config: {{ include "berth.configChecksum" . }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "berth.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  containers:
    - name: berth
      image: {{ include "berth.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["/usr/local/bin/berth"]
      args: ["serve", "--config", "/etc/berth/berth.toml"]
      ports:
        - name: registry
          containerPort: {{ .Values.containerPorts.registry }}
          protocol: TCP
        - name: admin
          containerPort: {{ .Values.containerPorts.admin }}
          protocol: TCP
      {{- $storeSecret := and .Values.objectStore.url .Values.objectStore.existingSecret }}
      {{- $s3Secret := and $storeSecret (eq (include "berth.objectStoreKind" .) "s3") }}
      {{- if or .Values.config.log.level $s3Secret .Values.extraEnv }}
      env:
        {{- with .Values.config.log.level }}
        - name: RUST_LOG
          value: {{ . | quote }}
        {{- end }}
        {{- if $s3Secret }}
        # cache.object_store.access_key_id_env
        - name: BERTH_S3_KEY_ID
          valueFrom:
            secretKeyRef:
              name: {{ .Values.objectStore.existingSecret }}
              key: {{ .Values.objectStore.accessKeyIdKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- if .Values.startupProbe.enabled }}
      startupProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ .Values.startupProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.startupProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.startupProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.livenessProbe.enabled }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: {{ .Values.livenessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.livenessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.livenessProbe.failureThreshold }}
      {{- end }}
      {{- if .Values.readinessProbe.enabled }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: {{ .Values.readinessProbe.periodSeconds }}
        timeoutSeconds: {{ .Values.readinessProbe.timeoutSeconds }}
        failureThreshold: {{ .Values.readinessProbe.failureThreshold }}
        successThreshold: {{ .Values.readinessProbe.successThreshold }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/berth/berth.toml
          subPath: berth.toml
          readOnly: true
        - name: cache
          mountPath: {{ include "berth.cacheDir" . }}
        - name: tmp
          mountPath: /tmp
        {{- range $i, $r := .Values.config.registries }}
        {{- if $r.existingSecret }}
        - name: credentials-{{ $i }}
          mountPath: {{ include "berth.secretDir" $r.name }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if $storeSecret }}
        - name: object-store-credentials
          mountPath: {{ include "berth.objectStoreSecretDir" . }}
          readOnly: true
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          mountPath: /etc/berth/tls
          readOnly: true
        {{- if .Values.tls.clientCaSecret }}
        - name: client-ca
          mountPath: /etc/berth/client-ca
          readOnly: true
        {{- end }}
        {{- if and .Values.cluster.clientCertSecret (include "berth.clusterEnabled" .) }}
        - name: cluster-tls
          mountPath: /etc/berth/cluster-tls
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if .Values.admin.enabled }}
        - name: admin-token
          mountPath: {{ include "berth.adminSecretDir" . }}
          readOnly: true
        {{- end }}
        {{- range $i, $n := .Values.config.notify }}
        {{- if $n.headersSecret }}
        - name: notify-headers-{{ $i }}
          mountPath: {{ include "berth.notifySecretDir" $i }}
          readOnly: true
        {{- end }}
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "berth.fullname" . }}
    - name: tmp
      emptyDir: {}
    {{- if not .Values.persistence.enabled }}
    - name: cache
      emptyDir:
        {{- with .Values.persistence.emptyDir.medium }}
        medium: {{ . }}
        {{- end }}
        {{- with .Values.persistence.emptyDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- else if eq .Values.workload "deployment" }}
    - name: cache
      persistentVolumeClaim:
        claimName: {{ include "berth.claimName" . }}
    {{- end }}
    {{- range $i, $r := .Values.config.registries }}
    {{- if $r.existingSecret }}
    - name: credentials-{{ $i }}
      secret:
        secretName: {{ $r.existingSecret }}
        defaultMode: 0440
        items:
          - key: {{ default "password" $r.passwordKey }}
            path: password
    {{- end }}
    {{- end }}
    {{- if and .Values.objectStore.url .Values.objectStore.existingSecret }}
    {{- $kind := include "berth.objectStoreKind" . }}
    - name: object-store-credentials
      secret:
        secretName: {{ .Values.objectStore.existingSecret }}
        defaultMode: 0440
        items:
          {{- if eq $kind "s3" }}
          # cache.object_store.secret_access_key_file; the access key id is in the environment.
          - key: {{ .Values.objectStore.secretAccessKeyKey }}
            path: secret-access-key
          {{- else if eq $kind "azure" }}
          # cache.object_store.access_key_file
          - key: {{ .Values.objectStore.accountKeyKey }}
            path: account-key
          {{- else }}
          # cache.object_store.service_account_file
          - key: {{ .Values.objectStore.serviceAccountKey }}
            path: service-account.json
          {{- end }}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.existingSecret }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          {{- if and .Values.cluster.tlsCaFromSecret (include "berth.clusterEnabled" .) }}
          - key: ca.crt
            path: ca.crt
          {{- end }}
    {{- if .Values.tls.clientCaSecret }}
    # [server.tls] client_ca: client certificates must be signed by this CA.
    - name: client-ca
      secret:
        secretName: {{ .Values.tls.clientCaSecret }}
        defaultMode: 0440
        items:
          - key: ca.crt
            path: ca.crt
    {{- end }}
    {{- if and .Values.cluster.clientCertSecret (include "berth.clusterEnabled" .) }}
    # [cluster] client_cert and client_key: sent to peers that require client certificates.
    - name: cluster-tls
      secret:
        secretName: {{ .Values.cluster.clientCertSecret }}
        defaultMode: 0440
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
    {{- end }}
    {{- end }}
    {{- if .Values.admin.enabled }}
    # admin.token_file
    - name: admin-token
      secret:
        secretName: {{ .Values.admin.tokenSecret }}
        defaultMode: 0440
        items:
          - key: {{ .Values.admin.tokenKey }}
            path: token
    {{- end }}
    {{- range $i, $n := .Values.config.notify }}
    {{- if $n.headersSecret }}
    # notify[{{ $i }}].header_file
    - name: notify-headers-{{ $i }}
      secret:
        secretName: {{ $n.headersSecret }}
        defaultMode: 0440
        items:
          - key: {{ default "headers" $n.headersKey }}
            path: headers
    {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (include "berth.topologySpreadConstraints" . | fromYamlArray) }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Explicit constraints (each given the selector labels when it has no labelSelector), else the
defaults for replicaCount > 1. Rendered as a YAML list. */}}
{{- define "berth.topologySpreadConstraints" -}}
{{- $selector := dict "matchLabels" (include "berth.selectorLabels" . | fromYaml) }}
{{- $out := list }}
{{- if .Values.topologySpreadConstraints }}
{{- range .Values.topologySpreadConstraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" $selector }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- else if and .Values.topologySpread.enabled (gt (int .Values.replicaCount) 1) }}
{{- range .Values.topologySpread.topologyKeys }}
{{- $out = append $out (dict "maxSkew" (int $.Values.topologySpread.maxSkew) "topologyKey" . "whenUnsatisfiable" $.Values.topologySpread.whenUnsatisfiable "labelSelector" $selector) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}
