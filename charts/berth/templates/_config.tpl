{{/*
berth.toml, rendered from .Values.config, .Values.objectStore, .Values.cluster and
.Values.admin (see values.yaml). [admin], [[hosted]] and [[notify]] come before the registries, so
that config.extraConfig still follows the last [[registry]]. Every string goes through berth.tomlString; optional keys (tls, balance, fallback,
rate limits, timeouts, the cache's negative_ttl, max_idle, pin and platforms) are rendered only when they are set, so berth's defaults apply otherwise.
config.extraConfig is appended last, as written.
*/}}
{{- define "berth.tomlNumber" -}}
{{- if kindIs "string" . }}
{{- include "berth.tomlString" . }}
{{- else if eq (float64 .) (float64 (int64 .)) }}
{{- int64 . }}
{{- else }}
{{- float64 . }}
{{- end }}
{{- end }}

{{- define "berth.tomlEndpoint" -}}
{{- if kindIs "string" . }}
{{- include "berth.tomlString" . }}
{{- else }}
{{- printf "{ url = %s, mirror = %t }" (include "berth.tomlString" .url) (default false .mirror) }}
{{- end }}
{{- end }}

{{- define "berth.toml" -}}
{{- $c := .Values.config -}}
# Rendered by the berth Helm chart for release {{ .Release.Name }} in namespace {{ .Release.Namespace }}.
[server]
listen = {{ include "berth.tomlString" (include "berth.listenAddress" (list $c.server.bindAddress .Values.containerPorts.registry)) }}
admin_listen = {{ include "berth.tomlString" (include "berth.listenAddress" (list $c.server.bindAddress .Values.containerPorts.admin)) }}
shutdown_grace = {{ include "berth.tomlString" $c.server.shutdownGrace }}
header_read_timeout = {{ include "berth.tomlString" $c.server.headerReadTimeout }}
{{- if .Values.tls.enabled }}

[server.tls]
cert = "/etc/berth/tls/tls.crt"
key = "/etc/berth/tls/tls.key"
{{- if .Values.tls.clientCaSecret }}
client_ca = "/etc/berth/client-ca/ca.crt"
{{- end }}
{{- end }}

[cache]
dir = {{ include "berth.tomlString" (include "berth.cacheDir" .) }}
max_size = {{ include "berth.tomlNumber" $c.cache.maxSize }}
tag_ttl = {{ include "berth.tomlString" $c.cache.tagTtl }}
{{- with $c.cache.negativeTtl }}
negative_ttl = {{ include "berth.tomlString" . }}
{{- end }}
{{- with $c.cache.maxIdle }}
max_idle = {{ include "berth.tomlString" . }}
{{- end }}
{{- with $c.cache.pin }}
pin = [
{{- range . }}
  {{ include "berth.tomlString" . }},
{{- end }}
]
{{- end }}
{{- with $c.cache.platforms }}
platforms = [{{ range $i, $p := . }}{{ if $i }}, {{ end }}{{ include "berth.tomlString" $p }}{{ end }}]
{{- end }}
{{- with .Values.objectStore }}
{{- if .url }}

[cache.object_store]
url = {{ include "berth.tomlString" .url }}
{{- with .endpoint }}
endpoint = {{ include "berth.tomlString" . }}
{{- end }}
{{- $kind := include "berth.objectStoreKind" $ }}
{{- if eq $kind "s3" }}
{{- with .region }}
region = {{ include "berth.tomlString" . }}
{{- end }}
{{- if .existingSecret }}
# The keys stay in Secret {{ .existingSecret }}: the id is in the environment, the secret in a mounted file.
access_key_id_env = "BERTH_S3_KEY_ID"
secret_access_key_file = {{ include "berth.tomlString" (printf "%s/secret-access-key" (include "berth.objectStoreSecretDir" $)) }}
{{- end }}
{{- else if eq $kind "azure" }}
{{- with .account }}
account = {{ include "berth.tomlString" . }}
{{- end }}
{{- if .existingSecret }}
# The account key stays in Secret {{ .existingSecret }}, mounted as a file.
access_key_file = {{ include "berth.tomlString" (printf "%s/account-key" (include "berth.objectStoreSecretDir" $)) }}
{{- end }}
{{- else if eq $kind "gcs" }}
{{- if .existingSecret }}
# The service account key stays in Secret {{ .existingSecret }}, mounted as a file.
service_account_file = {{ include "berth.tomlString" (printf "%s/service-account.json" (include "berth.objectStoreSecretDir" $)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

[log]
format = {{ include "berth.tomlString" $c.log.format }}
{{- if include "berth.clusterEnabled" . }}

[cluster]
# The headless Service: it resolves to every ready replica.
dns = {{ include "berth.tomlString" (include "berth.clusterDNS" .) }}
{{- with .Values.cluster.probeInterval }}
probe_interval = {{ include "berth.tomlString" . }}
{{- end }}
{{- with .Values.cluster.connectTimeout }}
connect_timeout = {{ include "berth.tomlString" . }}
{{- end }}
{{- if .Values.tls.enabled }}
# Peers are reached by pod IP: their certificate is checked against this name.
server_name = {{ include "berth.tomlString" (include "berth.clusterServerName" .) }}
{{- if .Values.cluster.tlsCaFromSecret }}
ca_file = "/etc/berth/tls/ca.crt"
{{- end }}
{{- if .Values.cluster.clientCertSecret }}
# Peers require client certificates: this one goes with every request to them.
client_cert = "/etc/berth/cluster-tls/tls.crt"
client_key = "/etc/berth/cluster-tls/tls.key"
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.admin.enabled }}

[admin]
# The token stays in Secret {{ .Values.admin.tokenSecret }}, mounted as a file.
token_file = {{ include "berth.tomlString" (printf "%s/token" (include "berth.adminSecretDir" .)) }}
{{- end }}
{{- range $c.hosted }}

[[hosted]]
name = {{ include "berth.tomlString" .name }}
repositories = [
{{- range (default list .repositories) }}
  {{ include "berth.tomlString" . }},
{{- end }}
]
delete = {{ default false .delete }}
{{- if not (kindIs "invalid" .maxBlobSize) }}
max_blob_size = {{ include "berth.tomlNumber" .maxBlobSize }}
{{- end }}
{{- with .uploadTtl }}
upload_ttl = {{ include "berth.tomlString" . }}
{{- end }}
{{- with .gcGrace }}
gc_grace = {{ include "berth.tomlString" . }}
{{- end }}
{{- end }}
{{- range $i, $n := $c.notify }}

[[notify]]
url = {{ include "berth.tomlString" $n.url }}
{{- with $n.events }}
events = [{{ range $j, $e := . }}{{ if $j }}, {{ end }}{{ include "berth.tomlString" $e }}{{ end }}]
{{- end }}
{{- with $n.headers }}
{{- $pairs := list }}
{{- range $k, $v := . }}
{{- $pairs = append $pairs (printf "%s = %s" (include "berth.tomlString" $k) (include "berth.tomlString" $v)) }}
{{- end }}
headers = { {{ join ", " $pairs }} }
{{- end }}
{{- if $n.headersSecret }}
# Headers from Secret {{ $n.headersSecret }} (`Name: value` lines), mounted as a file.
header_file = {{ include "berth.tomlString" (printf "%s/headers" (include "berth.notifySecretDir" $i)) }}
{{- end }}
{{- with $n.timeout }}
timeout = {{ include "berth.tomlString" . }}
{{- end }}
{{- if not (kindIs "invalid" $n.retries) }}
retries = {{ include "berth.tomlNumber" $n.retries }}
{{- end }}
{{- if not (kindIs "invalid" $n.queue) }}
queue = {{ include "berth.tomlNumber" $n.queue }}
{{- end }}
{{- end }}
{{- range $c.registries }}

[[registry]]
name = {{ include "berth.tomlString" .name }}
default = {{ default false .default }}
endpoints = [
{{- range .endpoints }}
  {{ include "berth.tomlEndpoint" . }},
{{- end }}
]
{{- if .username }}
username = {{ include "berth.tomlString" .username }}
{{- end }}
{{- if .existingSecret }}
password_file = {{ include "berth.tomlString" (printf "%s/password" (include "berth.secretDir" .name)) }}
{{- end }}
{{- with .connectTimeout }}
connect_timeout = {{ include "berth.tomlString" . }}
{{- end }}
{{- with .readTimeout }}
read_timeout = {{ include "berth.tomlString" . }}
{{- end }}
{{- with .balance }}
balance = {{ include "berth.tomlString" . }}
{{- end }}
{{- with .fallback }}
fallback = [
{{- range . }}
  {{ include "berth.tomlString" . }},
{{- end }}
]
{{- end }}
{{- if not (kindIs "invalid" .maxRequestsPerSecond) }}
max_requests_per_second = {{ include "berth.tomlNumber" .maxRequestsPerSecond }}
{{- end }}
{{- if not (kindIs "invalid" .burst) }}
burst = {{ include "berth.tomlNumber" .burst }}
{{- end }}
{{- end }}
{{- with $c.extraConfig }}

# config.extraConfig
{{ . }}
{{- end }}
{{- end }}
