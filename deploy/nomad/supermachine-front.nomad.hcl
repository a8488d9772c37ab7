# supermachine on Nomad, the front: a service job, stateless, two allocations, that finds the
# nodes (deploy/nomad/supermachine.nomad.hcl, service "supermachine-node") through Nomad's service
# discovery and serves clients as the service "supermachine".
#
#   nomad job run -var image=registry.example.com/supermachine:0.1.0 deploy/nomad/supermachine-front.nomad.hcl

variable "image" {
  type    = string
  default = "localhost/supermachine:0.1.0"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "supermachine-front" {
  type        = "service"
  datacenters = var.datacenters

  group "front" {
    count = 2

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = "supermachine"
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

    update {
      max_parallel = 1
      health_check = "checks"
    }

    task "front" {
      driver = "docker"

      kill_signal    = "SIGTERM"
      shutdown_delay = "5s"
      kill_timeout   = "40s"

      # The nodes' addresses from Nomad's service discovery, as a static list for --nodes. When
      # the set of nodes changes the front restarts with the new list (one allocation at a time,
      # splayed). With Consul, `--nodes dns:supermachine-node.service.consul:8080` avoids that.
      template {
        destination = "local/nodes.env"
        env         = true
        change_mode = "restart"
        splay       = "30s"
        data        = <<-EOT
          SUPERMACHINE_NODES={{ range $i, $s := nomadService "supermachine-node" }}{{ if $i }},{{ end }}{{ $s.Address }}:{{ $s.Port }}{{ end }}
        EOT
      }

      config {
        image = var.image
        ports = ["http"]
        args = [
          "serve",
          "--front",
          "--listen", "0.0.0.0:8080",
          "--nodes", "${SUPERMACHINE_NODES}",
          "--drain-grace", "30",
        ]
        cap_drop     = ["all"]
        security_opt = ["no-new-privileges"]
      }

      user = "supermachine"

      env {
        SUPERMACHINE_HOME = "/tmp/supermachine"
      }

      resources {
        cpu    = 250
        memory = 256
      }
    }
  }
}
