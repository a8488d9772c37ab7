# supermachine on Nomad, the nodes: a system job, one server per client node that has KVM, holding
# its VMs and snapshot cache on the node (/var/lib/supermachine). The front is the service job in
# supermachine-front.nomad.hcl (Nomad takes one job per file).
#
#   nomad var put nomad/jobs/supermachine-node keys_json=@keys.json   # from `supermachine keys create --keys keys.json`
#   nomad job run -var image=registry.example.com/supermachine:0.1.0 \
#     -var cache_from=registry.example.com/supermachine/cache deploy/nomad/supermachine.nomad.hcl
#   nomad job run -var image=registry.example.com/supermachine:0.1.0 deploy/nomad/supermachine-front.nomad.hcl
#
# Client nodes that run VMs set `meta { supermachine_kvm = "true" }` in their client config and
# let the Docker driver pass devices (the default) and the capabilities below (in Nomad's default
# allow list). See docs/scale-out.md.

variable "image" {
  type    = string
  default = "localhost/supermachine:0.1.0"
}

variable "cache_from" {
  type    = string
  default = "registry.example.com/supermachine/cache"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "supermachine-node" {
  type        = "system"
  datacenters = var.datacenters

  constraint {
    attribute = "${meta.supermachine_kvm}"
    value     = "true"
  }

  group "node" {
    network {
      port "http" {
        static = 8080
        to     = 8080
      }
    }

    service {
      name     = "supermachine-node"
      provider = "nomad"
      port     = "http"

      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "3s"
      }

      check {
        name     = "readyz"
        type     = "http"
        path     = "/readyz"
        interval = "5s"
        timeout  = "3s"
      }
    }

    task "serve" {
      driver = "docker"

      # SIGTERM drains: no new sandboxes, live ones get --drain-grace seconds, exit 0. Nomad first
      # deregisters the service and waits shutdown_delay (the front stops sending creates here),
      # then signals; kill_timeout must cover the drain grace.
      kill_signal    = "SIGTERM"
      shutdown_delay = "5s"
      kill_timeout   = "90s"

      config {
        image = var.image
        ports = ["http"]
        args = [
          "serve",
          "--listen", "0.0.0.0:8080",
          "--config", "/etc/supermachine/supermachine.config.ts",
          "--keys", "/etc/supermachine/keys/keys.json",
          "--cache-from", var.cache_from,
          "--frozen",
          "--lazy",
          "--node-name", "${node.unique.name}",
          "--drain-grace", "60",
        ]

        devices = [
          {
            host_path      = "/dev/kvm"
            container_path = "/dev/kvm"
          }
        ]

        # Root in the container with only what it uses: SETUID/SETGID run each QEMU as the
        # unprivileged `supermachine` user, CHOWN/FOWNER/DAC_OVERRIDE share files with it, KILL
        # stops it.
        cap_drop     = ["all"]
        cap_add      = ["chown", "dac_override", "fowner", "kill", "setgid", "setuid"]
        security_opt = ["no-new-privileges"]

        mount {
          type   = "bind"
          source = "/var/lib/supermachine"
          target = "/var/lib/supermachine"
        }

        mount {
          type     = "bind"
          source   = "local/supermachine.config.ts"
          target   = "/etc/supermachine/supermachine.config.ts"
          readonly = true
        }

        mount {
          type     = "bind"
          source   = "secrets/keys"
          target   = "/etc/supermachine/keys"
          readonly = true
        }
      }

      env {
        SUPERMACHINE_HOME = "/var/lib/supermachine"
        # SUPERMACHINE_CPU = "x86-64-v2"   # one CPU baseline on every node, so snapshots move
        # DEBUG = "supermachine:*"
      }

      # The project's config. Replace with your own (or `data = file("supermachine.config.ts")`).
      template {
        destination = "local/supermachine.config.ts"
        change_mode = "noop"
        data        = <<-EOT
          import { defineConfig, defineImage } from "supermachine/config";

          export default defineConfig({
            images: {
              python: defineImage({ ref: "python:3.12-slim-bookworm", memoryMib: 512 }),
            },
          });
        EOT
      }

      # The API key file, from a Nomad variable (only hashes of the keys are in it).
      template {
        destination = "secrets/keys/keys.json"
        change_mode = "noop"
        perms       = "0400"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/supermachine-node" }}{{ .keys_json }}{{ end }}
        EOT
      }

      resources {
        cpu        = 2000
        memory     = 4096
        memory_max = 32768
      }
    }
  }
}
