// Command scheduler is an example scheduler on the gpuwatch client package:
// it picks and leases GPUs across the given daemons, runs a command with
// CUDA_VISIBLE_DEVICES set to them, renews the lease while the command runs,
// and releases it when the command exits. (The command runs here; a real
// scheduler would launch it on the chosen host.)
//
//	scheduler -hosts node1:9450,node2:9450 -count 1 -min-free-gib 20 -- python train.py
//
// Exit status: the command's, or 1 when no GPU fits or a daemon refuses.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"gpuwatch/clients/go/gpuwatch"
	pb "gpuwatch/clients/go/gpuwatchv1"
)

func main() {
	hosts := flag.String("hosts", "127.0.0.1:9450", "daemons, comma-separated (names expand to all their addresses)")
	count := flag.Int("count", 1, "GPUs wanted")
	minFree := flag.Float64("min-free-gib", 0, "free memory each GPU must have, GiB")
	ttl := flag.Duration("ttl", 2*time.Minute, "lease TTL (renewed every TTL/3)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: scheduler [flags] -- COMMAND [ARGS...]")
		os.Exit(2)
	}
	ctx := context.Background()
	fleet, err := gpuwatch.NewFleet(ctx, strings.Split(*hosts, ","), true,
		gpuwatch.Options{Token: os.Getenv("GPUWATCH_TOKEN")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer fleet.Close()
	criteria := &pb.PickCriteria{}
	if *minFree > 0 {
		b := uint64(*minFree * (1 << 30))
		criteria.MinFreeMemoryBytes = &b
	}
	pick := fleet.Pick(ctx, *count, criteria, *ttl, strings.Join(flag.Args(), " "))
	if !pick.Satisfied {
		fmt.Fprintf(os.Stderr, "no GPUs fit: %v (failed hosts: %v)\n", pick.Shortfall, pick.Failed)
		os.Exit(1)
	}
	var host, devices string
	for h, d := range pick.CudaVisibleDevices {
		host, devices = h, d
		break
	}
	if len(pick.CudaVisibleDevices) > 1 {
		fmt.Fprintln(os.Stderr, "the picked GPUs span hosts; this example runs on the first only")
	}
	var ids []string
	for _, l := range pick.Leases[host] {
		ids = append(ids, l.Id)
	}
	client := fleet.Clients[host]
	defer func() { _, _ = client.Release(ctx, ids...) }()
	fmt.Printf("%s CUDA_VISIBLE_DEVICES=%s GPUWATCH_LEASES=%s\n", host, devices, strings.Join(ids, ","))
	cmd := exec.Command(flag.Arg(0), flag.Args()[1:]...)
	cmd.Env = append(os.Environ(), "CUDA_VISIBLE_DEVICES="+devices)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(*ttl / 3)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			_, _ = client.Release(ctx, ids...)
			if exit, ok := err.(*exec.ExitError); ok {
				os.Exit(exit.ExitCode())
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			return
		case <-tick.C:
			if _, err := client.Renew(ctx, 0, ids...); err != nil {
				fmt.Fprintln(os.Stderr, "renew:", err)
			}
		}
	}
}
