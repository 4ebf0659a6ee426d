{{/* Chart name, overridable. */}}
{{- define "berth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-berth, or RELEASE when it already contains the chart name. */}}
{{- define "berth.fullname" -}}
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

{{- define "berth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "berth.labels" -}}
{{ include "berth.selectorLabels" . }}
{{ include "berth.baseLabels" . }}
{{- end }}

{{- define "berth.nodeConfig.labels" -}}
{{ include "berth.nodeConfig.selectorLabels" . }}
{{ include "berth.baseLabels" . }}
{{- end }}

{{/* Labels of every resource besides the selector labels. */}}
{{- define "berth.baseLabels" -}}
helm.sh/chart: {{ include "berth.chart" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: berth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mirror
{{- end }}

{{/* Labels of the node configuration DaemonSet (a different component: never selected by the Service). */}}
{{- define "berth.nodeConfig.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-config
{{- end }}

{{- define "berth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "berth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest. Argument: an image dict and the default tag. */}}
{{- define "berth.imageRef" -}}
{{- $img := index . 0 }}
{{- $defaultTag := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $defaultTag $img.tag | toString) }}
{{- end }}
{{- end }}

{{- define "berth.image" -}}
{{- include "berth.imageRef" (list .Values.image .Chart.AppVersion) }}
{{- end }}

{{- define "berth.headlessServiceName" -}}
{{- printf "%s-headless" (include "berth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A TOML basic string: JSON string escapes are valid TOML escapes. */}}
{{- define "berth.tomlString" -}}
{{- toJson (toString .) }}
{{- end }}

{{/* host:port for a listener; IPv6 addresses get brackets. Argument: list address port. */}}
{{- define "berth.listenAddress" -}}
{{- $addr := index . 0 }}
{{- $port := index . 1 }}
{{- if contains ":" $addr }}
{{- printf "[%s]:%v" (trimAll "[]" $addr) $port }}
{{- else }}
{{- printf "%s:%v" $addr $port }}
{{- end }}
{{- end }}

{{/* The directory a registry's credentials are mounted in (registry names may hold a ':'). */}}
{{- define "berth.secretDir" -}}
{{- printf "/etc/berth/secrets/%s" (replace ":" "_" .) }}
{{- end }}

{{/* Whether the replicas form a [cluster] ("true" or ""): cluster.enabled, or for `auto`
replicaCount > 1. */}}
{{- define "berth.clusterEnabled" -}}
{{- $e := .Values.cluster.enabled }}
{{- if kindIs "bool" $e }}
{{- if $e }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true
{{- end }}
{{- end }}

{{/* Whether the headless Service is rendered ("true" or ""): it governs a StatefulSet's pod names
and is how clustered replicas find each other. */}}
{{- define "berth.headlessService" -}}
{{- if or (eq .Values.workload "statefulset") (include "berth.clusterEnabled" .) }}true{{ end }}
{{- end }}

{{/* cluster.dns: the headless Service's name, which resolves to every ready pod, and the
registry port the pods listen on. */}}
{{- define "berth.clusterDNS" -}}
{{- printf "%s://%s.%s.svc.%s:%v" (.Values.tls.enabled | ternary "https" "http") (include "berth.headlessServiceName" .) .Release.Namespace (trimSuffix "." .Values.cluster.clusterDomain) .Values.containerPorts.registry }}
{{- end }}

{{/* The name peers' TLS certificates are checked against: cluster.tlsServerName or the Service's name. */}}
{{- define "berth.clusterServerName" -}}
{{- .Values.cluster.tlsServerName | default (printf "%s.%s.svc.%s" (include "berth.fullname" .) .Release.Namespace (trimSuffix "." .Values.cluster.clusterDomain)) }}
{{- end }}

{{/* The directory the object store's secret access key is mounted in. */}}
{{- define "berth.objectStoreSecretDir" -}}
{{- if eq (include "berth.objectStoreKind" .) "s3" }}/etc/berth/s3{{ else }}/etc/berth/object-store{{ end }}
{{- end }}

{{/* The directory the admin token is mounted in. */}}
{{- define "berth.adminSecretDir" -}}
/etc/berth/admin
{{- end }}

{{/* The directory the headers of webhook number N (config.notify) are mounted in. */}}
{{- define "berth.notifySecretDir" -}}
{{- printf "/etc/berth/notify/%d" (int .) }}
{{- end }}

{{/* The cache directory inside the container. */}}
{{- define "berth.cacheDir" -}}
/var/lib/berth
{{- end }}

{{/* Whether a persistent claim backs the cache ("true" or ""). */}}
{{- define "berth.persistent" -}}
{{- if .Values.persistence.enabled }}true{{ end }}
{{- end }}

{{/* The name of the claim a Deployment uses. */}}
{{- define "berth.claimName" -}}
{{- default (printf "%s-cache" (include "berth.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Fails on values that the schema cannot catch. */}}
{{- define "berth.validate" -}}
{{- $defaults := 0 }}
{{- $names := dict }}
{{- range $i, $r := .Values.config.registries }}
{{- if hasKey $names $r.name }}
{{- fail (printf "config.registries[%d].name: %q is configured twice" $i $r.name) }}
{{- end }}
{{- $_ := set $names $r.name true }}
{{- if $r.default }}{{ $defaults = add1 $defaults }}{{ end }}
{{- if and $r.existingSecret (not $r.username) }}
{{- fail (printf "config.registries[%d] (%s): existingSecret needs a username" $i $r.name) }}
{{- end }}
{{- end }}
{{- if gt $defaults 1 }}
{{- fail "config.registries: only one registry may have default: true" }}
{{- end }}
{{- if and (eq .Values.workload "deployment") .Values.persistence.enabled (gt (int .Values.replicaCount) 1) }}
{{- fail "workload=deployment with persistence.enabled would share one cache volume between replicas (each needs its own cache directory, also with objectStore): use workload=statefulset (one claim per pod), persistence.enabled=false (an emptyDir per pod; with objectStore.url the bucket keeps the cache), or replicaCount=1" }}
{{- end }}
{{- $os := .Values.objectStore }}
{{- if and (not $os.url) (or $os.endpoint $os.region $os.account $os.existingSecret) }}
{{- fail "objectStore.endpoint, objectStore.region, objectStore.account and objectStore.existingSecret need objectStore.url (s3://BUCKET, az://CONTAINER or gs://BUCKET, each with an optional /PREFIX)" }}
{{- end }}
{{- $kind := include "berth.objectStoreKind" . }}
{{- if and $os.region (ne $kind "s3") }}
{{- fail (printf "objectStore.region is for s3:// URLs only, and objectStore.url is %s" $os.url) }}
{{- end }}
{{- if and $os.account (ne $kind "azure") }}
{{- fail (printf "objectStore.account is for az:// URLs only, and objectStore.url is %s" $os.url) }}
{{- end }}
{{- $all := deepCopy $names }}
{{- range $i, $h := .Values.config.hosted }}
{{- if hasKey $all $h.name }}
{{- fail (printf "config.hosted[%d].name: %q is configured twice (in config.registries or config.hosted)" $i $h.name) }}
{{- end }}
{{- $_ := set $all $h.name true }}
{{- end }}
{{- if .Values.config.hosted }}
{{- if not .Values.persistence.enabled }}
{{- fail "config.hosted needs persistence.enabled: pushed images live in the cache directory (/var/lib/berth/hosted), which would be an emptyDir, lost with the pod" }}
{{- end }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "config.hosted needs replicaCount=1: each replica serves the pushed images from its own volume (objectStore holds every push, but a tag moved or deleted, or a gc, on one replica is not seen by a replica that already holds the old content)" }}
{{- end }}
{{- end }}
{{- range $i, $n := .Values.config.notify }}
{{- range $k, $_ := (default dict $n.headers) }}
{{- if has (lower $k) (list "authorization" "proxy-authorization" "cookie") }}
{{- fail (printf "config.notify[%d].headers.%s: a secret header does not belong in the ConfigMap; put it in a Secret named by headersSecret (`Name: value` lines)" $i $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.admin.enabled (not .Values.admin.tokenSecret) }}
{{- fail "admin.enabled needs admin.tokenSecret (a Secret holding the admin token): the chart's admin_listen is not a loopback address, so berth answers /admin/ only with a token" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and (or .Values.tls.clientCaSecret .Values.cluster.clientCertSecret) (not .Values.tls.enabled) }}
{{- fail "tls.clientCaSecret and cluster.clientCertSecret need tls.enabled" }}
{{- end }}
{{- if and .Values.tls.clientCaSecret (include "berth.clusterEnabled" .) (not .Values.cluster.clientCertSecret) }}
{{- fail "tls.clientCaSecret with a cluster needs cluster.clientCertSecret: replicas that require client certificates must send one to each other" }}
{{- end }}
{{- if .Values.nodeConfig.enabled }}
{{- if and (eq .Values.nodeConfig.target "nodePort") (or (eq .Values.service.type "ClusterIP") (not .Values.service.nodePorts.registry)) }}
{{- fail "nodeConfig.target=nodePort needs service.type NodePort or LoadBalancer and a fixed service.nodePorts.registry" }}
{{- end }}
{{- if and (eq .Values.nodeConfig.target "custom") (not .Values.nodeConfig.endpoint) }}
{{- fail "nodeConfig.target=custom needs nodeConfig.endpoint (e.g. http://10.0.0.5:5000)" }}
{{- end }}
{{- range .Values.nodeConfig.registries }}
{{- if not (hasKey $names .) }}
{{- fail (printf "nodeConfig.registries: %q is not in config.registries" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod template's checksum annotations: pods roll when berth.toml changes. */}}
{{- define "berth.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* storageClassName of a claim: omitted (cluster default), "" for "-", else the class. */}}
{{- define "berth.storageClass" -}}
{{- if eq .Values.persistence.storageClass "-" }}
storageClassName: ""
{{- else if .Values.persistence.storageClass }}
storageClassName: {{ .Values.persistence.storageClass | quote }}
{{- end }}
{{- end }}

{{/* The TCP ports of all upstream endpoint and fallback URLs, of the object store's endpoint
(443 for AWS) and of the webhooks (config.notify), sorted, as a YAML list. */}}
{{- define "berth.upstreamPorts" -}}
{{- $urls := list }}
{{- range .Values.config.registries }}
{{- range .endpoints }}
{{- if kindIs "string" . }}
{{- $urls = append $urls . }}
{{- else }}
{{- $urls = append $urls .url }}
{{- end }}
{{- end }}
{{- range (default list .fallback) }}
{{- $urls = append $urls . }}
{{- end }}
{{- end }}
{{- with .Values.objectStore }}
{{- if .url }}
{{- $kind := include "berth.objectStoreKind" $ }}
{{- $default := get (dict "s3" "https://s3.amazonaws.com" "azure" "https://blob.core.windows.net" "gcs" "https://storage.googleapis.com") $kind }}
{{- $urls = append $urls (default $default .endpoint) }}
{{- if and (ne $kind "s3") (not .existingSecret) }}
{{- /* Managed identity or the GKE metadata server (169.254.169.254:80). */}}
{{- $urls = append $urls "http://169.254.169.254" }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.config.notify }}
{{- $urls = append $urls .url }}
{{- end }}
{{- $ports := dict }}
{{- range $urls }}
{{- $u := urlParse . }}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $u.host) }}
{{- if not $port }}
{{- $port = eq $u.scheme "http" | ternary "80" "443" }}
{{- end }}
{{- $_ := set $ports (printf "%05d" (atoi $port)) (atoi $port) }}
{{- end }}
{{- $out := list }}
{{- range (keys $ports | sortAlpha) }}
{{- $out = append $out (get $ports .) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The upstream a node's containerd falls back to for a registry: containerdServer, else the
first endpoint that is not another berth, else https://registry-1.docker.io for docker.io and
https://NAME for the rest. */}}
{{- define "berth.containerdServer" -}}
{{- $server := .containerdServer }}
{{- if not $server }}
{{- range .endpoints }}
{{- if and (not $server) (kindIs "string" .) }}
{{- $server = . }}
{{- else if and (not $server) (not .mirror) }}
{{- $server = .url }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $server }}
{{- $server = eq .name "docker.io" | ternary "https://registry-1.docker.io" (printf "https://%s" .name) }}
{{- end }}
{{- trimSuffix "/" $server }}
{{- end }}

{{/* The service objectStore.url names: s3, azure (az:// or azure://) or gcs (gs://); "" without
a url. */}}
{{- define "berth.objectStoreKind" -}}
{{- with .Values.objectStore.url }}
{{- $scheme := (urlParse .).scheme }}
{{- get (dict "s3" "s3" "az" "azure" "azure" "azure" "gs" "gcs") $scheme }}
{{- end }}
{{- end }}
