// Command vcsim runs govmomi's vCenter simulator for the appliance's vSphere tests.
//
// Debian packages govmomi's simulator library but not its vcsim command, so this is the
// launcher: the default vCenter inventory (one datacenter, a standalone host and a
// cluster of three, two VMs on each), served over https on 127.0.0.1. NAS datastores
// are folders in the working directory, named like the datastore.
//
// It prints the SDK URL on stdout once it accepts connections and stops on SIGTERM.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // the vAPI REST service: tags (appliance.vsphere.tags)
)

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0: any free port)")
	user := flag.String("user", "appliance", "the one user name that logs in")
	apiVersion := flag.String("api-version", "8.0.3.0", "vSphere API version the simulator announces")
	certificateFile := flag.String("certificate", "", "write the server's self-signed certificate (PEM) to this file")
	flag.Parse()

	// The password comes from the environment, as the appliance's own does, never argv.
	password := os.Getenv("VCSIM_PASSWORD")
	if password == "" {
		log.Fatal("VCSIM_PASSWORD is not set")
	}

	model := simulator.VPX()
	model.ServiceContent.About.ApiVersion = *apiVersion
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{
		Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(*port)),
		User: url.UserPassword(*user, password),
	}
	certificate, err := selfSigned()
	if err != nil {
		log.Fatal(err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{certificate}}
	model.Service.RegisterEndpoints = true // serve what the imported endpoint packages (vapi) register
	server := model.Service.NewServer()
	defer server.Close()
	// Real disk files, snapshots with deltas, CBT, /folder as ESXi serves it, and the
	// test-only control endpoint /appliance-test/ (loopback clients only, no
	// authentication: this launcher is for tests, never for a network).
	if err := simulator.ServeBackup(model.Service, server); err != nil {
		log.Fatal(err)
	}

	if *certificateFile != "" {
		block := &pem.Block{Type: "CERTIFICATE", Bytes: certificate.Certificate[0]}
		if err := os.WriteFile(*certificateFile, pem.EncodeToMemory(block), 0o644); err != nil {
			log.Fatal(err)
		}
	}

	// Listen for the stop signal before announcing the URL: a client may stop us at once,
	// and the deferred cleanup must still remove the local datastores' directories.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	sdk := *server.URL
	sdk.User = nil
	fmt.Println(sdk.String())
	<-stop
}

// selfSigned makes a certificate for 127.0.0.1 as a freshly installed vCenter has one:
// self-signed, so clients verify it only when given it as their CA. The simulator's own
// test certificate has a 1024-bit RSA key, which OpenSSL refuses before it gets that far.
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	template := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
