// A VM end to end from Node: create a VM, a host region, a memslot and a vCPU, run one
// batch that writes 8 bytes and reads them back, check the data, destroy the VM.
//
//   npm install && node vm.js [HOST:PORT] [--token TOKEN]
//
// The protos are loaded from protos/ at run time. 64-bit fields (ids, addresses, sizes,
// SPTEs) are loaded as strings (`longs: String`): a JavaScript number holds integers only
// up to 2^53, and an SPTE or an hva above that would silently lose bits. Enums are loaded
// by their wire names (`BACKING_THP`, `EXIT_REASON_DONE`), fields by their proto names
// (`keepCase`: `vm_id`, not `vmId`).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const FILES = ["vm", "host_memory", "memslot", "vcpu"].map((f) => `vmmu/v1/${f}.proto`);

const MIB = 1 << 20;
const GPA = 0x1000n;
const DATA = Buffer.from("from js!");

// Op byte of an access (vcpu.proto, AccessBatch): kind | log2(size) << 2 | WITH_DATA.
const READ = 1, WRITE = 2, SIZE_8 = 3 << 2, WITH_DATA = 1 << 4;

function load() {
  const definition = protoLoader.loadSync(FILES, {
    includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).vmmu.v1;
}

// A service's unary methods as functions returning promises, each call with `metadata`.
function client(Service, target, metadata) {
  const stub = new Service(target, grpc.credentials.createInsecure());
  const methods = {};
  for (const name of Object.keys(Service.service)) {
    methods[name] = (request) => new Promise((resolve, reject) =>
      stub[name](request, metadata, (error, response) =>
        (error ? reject(error) : resolve(response))));
  }
  return methods;
}

// The packed batch: u64 little-endian gpas, one op byte per access, the write data.
function batch(accesses) {
  const gpas = Buffer.alloc(8 * accesses.length);
  accesses.forEach((a, i) => gpas.writeBigUInt64LE(a.gpa, 8 * i));
  return {
    gpas,
    ops: Buffer.from(accesses.map((a) => a.op)),
    write_data: Buffer.concat(accesses.filter((a) => a.data).map((a) => a.data)),
  };
}

async function main() {
  const args = process.argv.slice(2);
  const tokenAt = args.indexOf("--token");
  const token = tokenAt >= 0 ? args.splice(tokenAt, 2)[1] : null;
  const target = args[0] || "127.0.0.1:50051";
  // A server started with --token-file wants every call to carry its token.
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);

  const v1 = load();
  const [VmService, HostMemoryService, MemslotService, VcpuService] =
    ["VmService", "HostMemoryService", "MemslotService", "VcpuService"]
      .map((name) => client(v1[name], target, metadata));

  const { vm } = await VmService.CreateVm({
    config: { max_vcpus: 1, tdp_levels: 4, ad_bits: true, name: "from-node" },
  });
  console.log(`created VM ${vm.id} (${vm.name})`);
  try {
    const { region } = await HostMemoryService.CreateRegion({
      vm_id: vm.id, size: String(4 * MIB), backing: "BACKING_THP",
    });
    console.log(`region at hva ${BigInt(region.hva).toString(16)} (${region.backing})`);
    await MemslotService.SetUserMemoryRegion({
      vm_id: vm.id, slot: 0, flags: 0, guest_phys_addr: "0", memory_size: String(4 * MIB),
      userspace_addr: region.hva,
    });
    await VcpuService.CreateVcpu({ vm_id: vm.id, vcpu_id: 0 });

    const { result } = await VcpuService.RunBatch({
      vm_id: vm.id, vcpu_id: 0,
      batch: batch([
        { gpa: GPA, op: WRITE | SIZE_8 | WITH_DATA, data: DATA },
        { gpa: GPA, op: READ | SIZE_8 | WITH_DATA },
      ]),
    });
    console.log(`run: ${result.exit.reason}, ${result.completed} accesses, ` +
                `read ${JSON.stringify(result.read_data.toString())}`);
    if (result.exit.reason !== "EXIT_REASON_DONE" || result.completed !== "2" ||
        !result.read_data.equals(DATA)) {
      throw new Error("the batch did not read back what it wrote");
    }
    const walk = await VmService.WalkEpt({ vm_id: vm.id, gpa: GPA.toString() });
    const leaf = walk.sptes[walk.sptes.length - 1];
    console.log(`leaf SPTE ${BigInt(leaf.spte).toString(16)} (${leaf.kind}, level ${leaf.level})`);
  } finally {
    await VmService.DestroyVm({ vm_id: vm.id });
    console.log(`destroyed VM ${vm.id}`);
  }
  const { vms } = await VmService.ListVms({});
  if (vms.some((other) => other.id === vm.id)) throw new Error("the VM outlived DestroyVm");
  console.log("ok");
}

main().catch((error) => {
  console.error(`error: ${error.code !== undefined ? `${grpc.status[error.code]}: ` : ""}` +
                `${error.details || error.message}`);
  process.exit(1);
});
