// Command cluster-dns answers a lab cluster's DNS the way CoreDNS's
// kubernetes plugin does (the Kubernetes DNS specification,
// kubernetes/dns docs/specification.md), so that e2e.test's DNS and Services
// conformance specs can run here: no registry serves CoreDNS, and Debian
// packages none. It is test infrastructure, not part of weft: it runs as a
// Deployment behind the kube-dns Service, so every lookup crosses the pod
// network (pod → ClusterIP → kube-proxy → this pod, through weft).
//
// Served, in the cluster domain (--domain, default cluster.local):
//   - <svc>.<ns>.svc: A of the ClusterIP; of each ready endpoint for a
//     headless Service; CNAME to externalName for an ExternalName Service;
//   - <host>.<svc>.<ns>.svc: A of a headless Service's endpoint, named by its
//     hostname or its address with dashes;
//   - _<port>._<proto>.<svc>.<ns>.svc (and <svc>.<ns>.svc): SRV per port;
//   - <a-b-c-d>.<ns>.pod: A a.b.c.d (CoreDNS's "pods insecure");
//   - <d.c.b.a>.in-addr.arpa: PTR of ClusterIPs and headless endpoints.
//
// Names outside the domain get NXDOMAIN: there is no upstream here.
//
// Built by tests/kube/build.sh in GOPATH mode inside the kubernetes tree
// (its vendored client-go and miekg/dns).
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"strings"
	"time"

	"github.com/miekg/dns"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

const ttl = 5

type server struct {
	zone      string // "cluster.local."
	services  listers.ServiceLister
	endpoints listers.EndpointsLister
}

func main() {
	domain := flag.String("domain", "cluster.local", "the cluster's DNS domain")
	listen := flag.String("listen", ":53", "address to serve DNS on (UDP and TCP)")
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig (default: in-cluster)")
	flag.Parse()

	var cfg *rest.Config
	var err error
	if *kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", *kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		log.Fatalf("cluster-dns: API config: %v", err)
	}
	client := kubernetes.NewForConfigOrDie(cfg)
	factory := informers.NewSharedInformerFactory(client, 10*time.Minute)
	s := &server{
		zone:      dns.Fqdn(strings.ToLower(*domain)),
		services:  factory.Core().V1().Services().Lister(),
		endpoints: factory.Core().V1().Endpoints().Lister(),
	}
	stop := make(chan struct{})
	factory.Start(stop)
	for t, ok := range factory.WaitForCacheSync(stop) {
		if !ok {
			log.Fatalf("cluster-dns: cache of %v did not sync", t)
		}
	}
	log.Printf("cluster-dns: serving %s on %s", s.zone, *listen)
	dns.HandleFunc(".", s.handle)
	errs := make(chan error, 2)
	for _, proto := range []string{"udp", "tcp"} {
		srv := &dns.Server{Addr: *listen, Net: proto}
		go func() { errs <- srv.ListenAndServe() }()
	}
	log.Fatalf("cluster-dns: %v", <-errs)
}

func (s *server) handle(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		_ = w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	var found bool
	switch {
	case strings.HasSuffix(name, ".in-addr.arpa."):
		found = s.ptr(m, q, name)
	case strings.HasSuffix(name, "."+s.zone):
		found = s.cluster(m, q, strings.TrimSuffix(name, "."+s.zone))
	}
	if !found {
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{s.soa()}
	} else if len(m.Answer) == 0 {
		m.Ns = []dns.RR{s.soa()}
	}
	_ = w.WriteMsg(m)
}

func (s *server) soa() dns.RR {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: s.zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttl},
		Ns:      "ns.dns." + s.zone,
		Mbox:    "hostmaster." + s.zone,
		Serial:  1,
		Refresh: 7200,
		Retry:   1800,
		Expire:  86400,
		Minttl:  ttl,
	}
}

func hdr(name string, t uint16) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
}

func a(name string, ip net.IP) dns.RR {
	return &dns.A{Hdr: hdr(name, dns.TypeA), A: ip.To4()}
}

// dashed is an address as a DNS label: 10.0.0.1 → 10-0-0-1.
func dashed(ip string) string { return strings.ReplaceAll(ip, ".", "-") }

// endpoint is one ready address of a headless Service with its DNS name.
type endpoint struct {
	host string
	ip   net.IP
}

func (s *server) ready(svc *v1.Service) []endpoint {
	ep, err := s.endpoints.Endpoints(svc.Namespace).Get(svc.Name)
	if err != nil {
		return nil
	}
	var out []endpoint
	for _, sub := range ep.Subsets {
		for _, addr := range sub.Addresses {
			host := addr.Hostname
			if host == "" {
				host = dashed(addr.IP)
			}
			if ip := net.ParseIP(addr.IP); ip != nil && ip.To4() != nil {
				out = append(out, endpoint{host: host, ip: ip})
			}
		}
	}
	return out
}

// cluster answers `rest`, the name without the zone.
func (s *server) cluster(m *dns.Msg, q dns.Question, rest string) bool {
	labels := strings.Split(rest, ".")
	n := len(labels)
	switch {
	case n == 3 && labels[2] == "pod":
		ip := net.ParseIP(strings.ReplaceAll(labels[0], "-", "."))
		if ip == nil || ip.To4() == nil {
			return false
		}
		if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, a(q.Name, ip))
		}
		return true
	case n >= 3 && labels[n-1] == "svc":
		svcName, ns := labels[n-3], labels[n-2]
		svc, err := s.services.Services(ns).Get(svcName)
		if err != nil {
			return false
		}
		base := fmt.Sprintf("%s.%s.svc.%s", svcName, ns, s.zone)
		switch n {
		case 3:
			s.service(m, q, svc, base, "", "")
			return true
		case 4: // <host>.<svc>.<ns>.svc
			if svc.Spec.ClusterIP != v1.ClusterIPNone {
				return false
			}
			for _, e := range s.ready(svc) {
				if e.host == labels[0] {
					if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
						m.Answer = append(m.Answer, a(q.Name, e.ip))
					}
					return true
				}
			}
			return false
		case 5: // _<port>._<proto>.<svc>.<ns>.svc
			port, proto := strings.TrimPrefix(labels[0], "_"), strings.TrimPrefix(labels[1], "_")
			return s.service(m, q, svc, base, port, proto)
		}
	case n == 2 && labels[1] == "svc", n == 1 && labels[0] == "svc":
		// A namespace (or the svc subdomain) exists as a name with no data.
		return n == 1 || s.namespaceKnown(labels[0])
	}
	return false
}

func (s *server) namespaceKnown(ns string) bool {
	list, err := s.services.Services(ns).List(labels.Everything())
	return err == nil && len(list) > 0 || ns == "default"
}

// service answers for `svc` at `base`; with port and proto set, only its
// SRV records of that port (false if it has none).
func (s *server) service(m *dns.Msg, q dns.Question, svc *v1.Service, base, port, proto string) bool {
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		if port != "" {
			return false
		}
		m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(q.Name, dns.TypeCNAME), Target: dns.Fqdn(svc.Spec.ExternalName)})
		return true
	}
	headless := svc.Spec.ClusterIP == v1.ClusterIPNone
	var eps []endpoint
	if headless {
		eps = s.ready(svc)
	}
	matched := port == ""
	for _, p := range svc.Spec.Ports {
		if port != "" && (p.Name != port || !strings.EqualFold(string(p.Protocol), proto)) {
			continue
		}
		matched = true
		if q.Qtype != dns.TypeSRV && q.Qtype != dns.TypeANY {
			continue
		}
		if headless {
			for _, e := range eps {
				target := e.host + "." + base
				m.Answer = append(m.Answer, &dns.SRV{Hdr: hdr(q.Name, dns.TypeSRV), Priority: 0, Weight: 100, Port: uint16(p.Port), Target: target})
				m.Extra = append(m.Extra, a(target, e.ip))
			}
		} else if ip := net.ParseIP(svc.Spec.ClusterIP); ip != nil {
			m.Answer = append(m.Answer, &dns.SRV{Hdr: hdr(q.Name, dns.TypeSRV), Priority: 0, Weight: 100, Port: uint16(p.Port), Target: base})
			m.Extra = append(m.Extra, a(base, ip))
		}
	}
	if port != "" || !(q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY) {
		return matched
	}
	if headless {
		for _, e := range eps {
			m.Answer = append(m.Answer, a(q.Name, e.ip))
		}
	} else if ip := net.ParseIP(svc.Spec.ClusterIP); ip != nil && ip.To4() != nil {
		m.Answer = append(m.Answer, a(q.Name, ip))
	}
	return true
}

// ptr answers reverse lookups of ClusterIPs and headless endpoints.
func (s *server) ptr(m *dns.Msg, q dns.Question, name string) bool {
	parts := strings.Split(strings.TrimSuffix(name, ".in-addr.arpa."), ".")
	if len(parts) != 4 {
		return false
	}
	ip := strings.Join([]string{parts[3], parts[2], parts[1], parts[0]}, ".")
	svcs, err := s.services.List(labels.Everything())
	if err != nil {
		return false
	}
	for _, svc := range svcs {
		base := fmt.Sprintf("%s.%s.svc.%s", svc.Name, svc.Namespace, s.zone)
		var target string
		if svc.Spec.ClusterIP == ip {
			target = base
		} else if svc.Spec.ClusterIP == v1.ClusterIPNone {
			for _, e := range s.ready(svc) {
				if e.ip.String() == ip {
					target = e.host + "." + base
				}
			}
		}
		if target != "" {
			if q.Qtype == dns.TypePTR || q.Qtype == dns.TypeANY {
				m.Answer = append(m.Answer, &dns.PTR{Hdr: hdr(q.Name, dns.TypePTR), Ptr: target})
			}
			return true
		}
	}
	return false
}
