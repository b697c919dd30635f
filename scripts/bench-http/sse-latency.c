/* sse-latency.c — append-to-SSE latency: N raw SSE clients on /all/live
 * (one epoll thread) while A appender threads POST events carrying their
 * send time (CLOCK_REALTIME ns) at RATE events/s in total for S seconds.
 * Prints appended rate, messages received vs expected (N x appended), and
 * latency percentiles (receive time - send time; first 0.5 s skipped).
 *   cc -O2 -pthread -o build/sse-latency scripts/bench-http/sse-latency.c
 *   build/sse-latency PORT CLIENTS RATE SECONDS APPENDERS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static int port, napp; static double rate, secs; static volatile int stop;
static long long now_ns(){struct timespec t;clock_gettime(CLOCK_REALTIME,&t);return t.tv_sec*1000000000LL+t.tv_nsec;}
static int conn(){int fd=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={0};a.sin_family=AF_INET;a.sin_port=htons(port);a.sin_addr.s_addr=htonl(0x7f000001);if(connect(fd,(void*)&a,sizeof a)){perror("connect");exit(1);}int one=1;setsockopt(fd,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);return fd;}
static long sent;
static void *appender(void *arg){ long id=(long)arg; int fd=conn(); char req[1024],body[256],buf[4096]; double interval=napp/rate; long long next=now_ns(); long n=0;
 while(!stop){ long long t=now_ns(); if(t<next){struct timespec d={0,(next-t)};nanosleep(&d,0);continue;} next+= (long long)(interval*1e9);
  int bl=snprintf(body,sizeof body,"{\"type\":\"Tick\",\"data\":{\"t\":%lld,\"a\":%ld}}",now_ns(),id);
  int rl=snprintf(req,sizeof req,"POST /streams/lat-%ld HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s",id,bl,body);
  if(write(fd,req,rl)!=rl)break; int got=0; for(;;){int r=read(fd,buf+got,sizeof buf-got-1);if(r<=0)goto out;got+=r;buf[got]=0;char*e=strstr(buf,"\r\n\r\n");if(e){char*cl=strcasestr(buf,"Content-Length:");int L=cl?atoi(cl+15):0;if(got>=(e-buf)+4+L)break;}}
  n++; __sync_fetch_and_add(&sent,1);} out: close(fd); return 0;}
typedef struct {int fd; char *buf; int len;} cl;
static long long *lat; static long nlat, caplat;
int main(int c,char**v){ port=atoi(v[1]); int nc=atoi(v[2]); rate=atof(v[3]); secs=atof(v[4]); napp=atoi(v[5]);
 int ep=epoll_create1(0); cl *cs=calloc(nc,sizeof *cs); caplat=(long)(rate*secs*nc*1.2)+1000; lat=malloc(caplat*sizeof *lat);
 for(int i=0;i<nc;i++){cs[i].fd=conn(); const char*r="GET /all/live HTTP/1.1\r\nHost: x\r\n\r\n"; write(cs[i].fd,r,strlen(r)); fcntl(cs[i].fd,F_SETFL,O_NONBLOCK); cs[i].buf=malloc(1<<20); struct epoll_event e={EPOLLIN,{.u32=i}}; epoll_ctl(ep,EPOLL_CTL_ADD,cs[i].fd,&e);}
 usleep(300000);
 pthread_t t[256]; for(long i=0;i<napp;i++)pthread_create(&t[i],0,appender,(void*)i);
 long long t0=now_ns(), warm=t0+500000000LL, end=t0+(long long)(secs*1e9); long total=0;
 struct epoll_event evs[256];
 while(1){ long long tn=now_ns(); if(tn>end && !stop){stop=1;} if(stop && tn>end+500000000LL)break;
  int n=epoll_wait(ep,evs,256,50); for(int k=0;k<n;k++){ cl *x=&cs[evs[k].data.u32]; int r=read(x->fd,x->buf+x->len,(1<<20)-x->len-1); if(r<=0)continue; long long rt=now_ns(); x->len+=r; x->buf[x->len]=0;
   char *p=x->buf, *nl; while((nl=memchr(p,'\n',x->buf+x->len-p))){ if(!strncmp(p,"data: ",6)){ char*tt=strstr(p,"\"t\":"); if(tt&&tt<nl){ long long ts=atoll(tt+4); total++; if(ts>warm && ts<end && nlat<caplat) lat[nlat++]=rt-ts; } } p=nl+1; }
   memmove(x->buf,p,x->buf+x->len-p); x->len=x->buf+x->len-p; } }
 for(int i=0;i<napp;i++)pthread_join(t[i],0);
 int cmp(const void*a,const void*b){long long x=*(long long*)a,y=*(long long*)b;return x<y?-1:x>y;} qsort(lat,nlat,sizeof *lat,cmp);
 printf("clients=%d target_rate=%.0f appended=%ld (%.0f/s) messages=%ld (expected %ld) p50=%.3fms p90=%.3fms p99=%.3fms p999=%.3fms max=%.3fms\n",nc,rate,sent,sent/secs,total,sent*nc,
  lat[nlat/2]/1e6,lat[nlat*9/10]/1e6,lat[nlat*99/100]/1e6,lat[nlat*999/1000]/1e6,lat[nlat-1]/1e6); return 0;}
